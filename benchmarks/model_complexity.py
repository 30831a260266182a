"""Parameters and multiply-adds of every registered variant, next to the paper's figures.

Usage: python benchmarks/model_complexity.py [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_section  # noqa: E402
from detector.complexity import count_madds, count_params  # noqa: E402
from detector.models import build_model, list_models  # noqa: E402

# Saha et al. 2020 (Table 5 and the issue text): parameters and MAdds at the variant's input size.
PAPER = {
    "rnnpool_face_m4_paper": ("~56K", "70M"),
    "rnnpool_face_quant": ("~71K", "120M"),
    "rnnpool_face_c": ("~1.52M", "1.80G"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    rows = ["| model | input | params | paper params | MAdds (shared row/col summaries) | MAdds (per patch) | "
            "of which RNNPool | paper MAdds |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in list_models():
        m = build_model(name)
        w, h = m.config.input_size
        shape = (m.config.in_channels, h, w)
        madds = count_madds(m, shape)
        madds_pp = count_madds(m, shape, per_patch_rnnpool=True)
        stem_hw = (h, w)
        for _, s in m.config.stem:
            stem_hw = (-(-stem_hw[0] // s), -(-stem_hw[1] // s))
        rnn = m.rnnpool.madds(*stem_hw)
        paper_p, paper_m = PAPER.get(name, ("-", "-"))
        rows.append(f"| {name} | {w}x{h}x{m.config.in_channels} | {count_params(m):,} | {paper_p} | "
                    f"{madds / 1e6:.1f}M | {madds_pp / 1e6:.1f}M | {rnn / 1e6:.1f}M | {paper_m} |")
    body = "\n".join(rows) + """

MAdds count convolutions and RNN matrix products (BatchNorm folds into the convolutions; activations and
element-wise gate arithmetic are not counted). "Shared" is what `detector.nn.RNNPool` computes: with 8x8 patches
at stride 4, vertically adjacent patches read the same row segments, so RNN1 runs once per segment instead of once
per patch; "per patch" is the paper's formulation (RNNPool then dominates the M4 budget). The paper does not say how it
counted; our shared count is the closest to its figures."""
    print(body)
    if args.write:
        write_section("Model size and multiply-adds", "python benchmarks/model_complexity.py --write", body)


if __name__ == "__main__":
    main()
