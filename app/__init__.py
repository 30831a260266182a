"""The RNNPool-Face web service (FastAPI): ``app.main.create_app`` builds it, ``app.main.serve`` runs it."""
