/* Host driver: detect <frame.raw> (W*H uint8 grayscale, row-major); prints one line per head location:
 * "<head> v0 v1 ..." (int32 accumulators), then "# ..." statistics lines. */
#include <stdio.h>
#include <stdlib.h>

#include "model.h"

#if defined(RP_GUARD_BYTES) && RP_GUARD_BYTES > 0
void network_guard_fill(void);
unsigned network_guard_check(void);
#endif

static void emit_print(void *ctx, int head, const int32_t *v, int n)
{
    FILE *f = (FILE *)ctx;
    fprintf(f, "%d", head);
    for (int i = 0; i < n; i++)
        fprintf(f, " %ld", (long)v[i]);
    fputc('\n', f);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s frame.raw (%dx%d uint8)\n", argv[0], RP_IN_W, RP_IN_H);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    size_t got = fread(network_input(), 1, RP_FRAME_BYTES, f);
    fclose(f);
    if (got != RP_FRAME_BYTES) {
        fprintf(stderr, "%s: expected %d bytes, got %zu\n", argv[1], RP_FRAME_BYTES, got);
        return 1;
    }
#if defined(RP_GUARD_BYTES) && RP_GUARD_BYTES > 0
    network_guard_fill();
#ifdef RP_GUARD_SELFTEST /* proves the check works: one byte written just past the arena */
    network_input()[RP_ARENA_BYTES] = 0;
#endif
#endif
    network_run(emit_print, stdout);
    printf("# arena_bytes %d\n", RP_ARENA_BYTES);
#if defined(RP_GUARD_BYTES) && RP_GUARD_BYTES > 0
    unsigned touched = network_guard_check();
    printf("# guard_bytes_touched %u\n", touched);
    if (touched) {
        fprintf(stderr, "%u guard bytes around the arena were overwritten\n", touched);
        return 3;
    }
#endif
    return 0;
}
