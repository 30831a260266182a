/* Cortex-M4 driver for QEMU netduinoplus2 (semihosting): reads frame.raw from the host's working
 * directory, runs the network once with a no-op output (timed with SysTick; under -icount shift=0
 * SysTick ticks are proportional to instructions, calibrated here with a loop of known length),
 * then again printing the head outputs exactly like the host build, then statistics lines. */
#include <stdint.h>
#include <string.h>

#include "model.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018)

extern uint32_t _sdata, _edata, _sbss, _ebss, _sstack, _estack;
uint32_t stack_peak_bytes(void);

static volatile uint32_t systick_wraps;
static uint64_t ticks(void);

/* SysTick after each network stage (network.c calls rp_mark when built with RP_PROFILE) */
#define MAX_MARKS 16
static uint64_t marks[MAX_MARKS];
static int nmarks;

void rp_mark(int stage)
{
    if (stage < MAX_MARKS) {
        marks[stage] = ticks();
        if (stage + 1 > nmarks)
            nmarks = stage + 1;
    }
}

void SysTick_Handler(void)
{
    systick_wraps++;
}

static int semihost(int op, void *arg)
{
    register int r0 __asm("r0") = op;
    register void *r1 __asm("r1") = arg;
    __asm volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void semihost_exit(int code)
{
    semihost(0x18, (void *)(uintptr_t)(code == 0 ? 0x20026 : 0x20023));
}

static int sh_open(const char *name, int mode)
{
    uint32_t a[3] = {(uint32_t)(uintptr_t)name, (uint32_t)mode, (uint32_t)strlen(name)};
    return semihost(0x01, a);
}

static int sh_read(int fd, void *buf, uint32_t n) /* returns bytes NOT read */
{
    uint32_t a[3] = {(uint32_t)fd, (uint32_t)(uintptr_t)buf, n};
    return semihost(0x06, a);
}

static void sh_close(int fd)
{
    uint32_t a[1] = {(uint32_t)fd};
    semihost(0x02, a);
}

/* ---- buffered console output */
static int tty = -1;
static char obuf[128]; /* small: every byte of .bss counts against the RAM budget */
static uint32_t olen;

static void flush_out(void)
{
    if (olen) {
        uint32_t a[3] = {(uint32_t)tty, (uint32_t)(uintptr_t)obuf, olen};
        semihost(0x05, a);
        olen = 0;
    }
}

static void put_str(const char *s)
{
    while (*s) {
        if (olen == sizeof obuf)
            flush_out();
        obuf[olen++] = *s++;
    }
}

static void put_int(long long v)
{
    char tmp[24];
    int i = 0;
    unsigned long long u = v < 0 ? (unsigned long long)(-v) : (unsigned long long)v;
    do {
        tmp[i++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[i++] = '-';
    char s[24];
    for (int k = 0; k < i; k++)
        s[k] = tmp[i - 1 - k];
    s[i] = 0;
    put_str(s);
}

static void put_kv(const char *key, long long v)
{
    put_str("# ");
    put_str(key);
    put_str(" ");
    put_int(v);
    put_str("\n");
}

static void emit_print(void *ctx, int head, const int32_t *v, int n)
{
    (void)ctx;
    put_int(head);
    for (int i = 0; i < n; i++) {
        put_str(" ");
        put_int(v[i]);
    }
    put_str("\n");
}

static void emit_sum(void *ctx, int head, const int32_t *v, int n)
{
    uint32_t *sum = (uint32_t *)ctx;
    for (int i = 0; i < n; i++)
        *sum = *sum * 31u + (uint32_t)v[i] + (uint32_t)head;
}

/* ---- SysTick as a 64-bit counter of (scaled) instructions */
static uint64_t ticks(void)
{
    uint32_t w1, w2, v;
    do {
        w1 = systick_wraps;
        v = SYST_CVR;
        w2 = systick_wraps;
    } while (w1 != w2);
    return (uint64_t)w1 * (1u << 24) + (0xFFFFFFu - v);
}

__attribute__((noinline)) static void spin(uint32_t n) /* 2 instructions per iteration */
{
    __asm volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(n));
}

static int load_frame(void)
{
    int fd = sh_open("frame.raw", 1 /* rb */);
    if (fd < 0)
        return -1;
    int left = sh_read(fd, network_input(), RP_FRAME_BYTES);
    sh_close(fd);
    return left == 0 ? 0 : -1;
}

int main(void)
{
    tty = sh_open(":tt", 4 /* w */);
    SYST_RVR = 0xFFFFFF;
    SYST_CVR = 0;
    SYST_CSR = 7; /* processor clock, interrupt, enable */

    const uint32_t spin_n = 2000000;
    spin(1000); /* let SysTick load its reload value before the first reading */
    uint64_t t0 = ticks();
    spin(spin_n);
    uint64_t cal = ticks() - t0; /* ~ ticks for 2 * spin_n instructions */

    if (load_frame() != 0) {
        put_str("ERROR cannot read frame.raw\n");
        flush_out();
        return 1;
    }
    uint32_t sum = 0;
    t0 = ticks();
    network_run(emit_sum, &sum);
    uint64_t net = ticks() - t0;
    uint64_t stage_ticks[MAX_MARKS];
    for (int i = 0; i < nmarks; i++)
        stage_ticks[i] = marks[i] - (i ? marks[i - 1] : t0);

    if (load_frame() != 0)
        return 1;
    network_run(emit_print, 0);

    put_kv("ticks", (long long)net);
    put_kv("cal_ticks", (long long)cal);
    put_kv("cal_instructions", 2LL * spin_n);
    put_kv("instructions", (long long)(net * (2ULL * spin_n) / (cal ? cal : 1)));
    for (int i = 0; i < nmarks; i++) {
        char key[16] = "stage_";
        key[6] = (char)('0' + i / 10);
        key[7] = (char)('0' + i % 10);
        key[8] = 0;
        put_kv(key, (long long)(stage_ticks[i] * (2ULL * spin_n) / (cal ? cal : 1)));
    }
    put_kv("stack_peak_bytes", (long long)stack_peak_bytes());
    put_kv("data_bytes", (long long)((uintptr_t)&_edata - (uintptr_t)&_sdata));
    put_kv("bss_bytes", (long long)((uintptr_t)&_ebss - (uintptr_t)&_sbss));
    put_kv("stack_reserved_bytes", (long long)((uintptr_t)&_estack - (uintptr_t)&_sstack));
    put_kv("arena_bytes", RP_ARENA_BYTES);
    put_kv("checksum", (long long)sum);
    flush_out();
    return 0;
}
