/* Minimal Cortex-M4 startup for QEMU netduinoplus2: vector table, .data/.bss init, FPU on,
 * stack painting (every free stack word = STACK_PAINT until the deepest use). */
#include <stdint.h>

#define STACK_PAINT 0xA5A5A5A5u

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _sstack, _estack;
int main(void);
void Reset_Handler(void);
void SysTick_Handler(void);

static void Default_Handler(void)
{
    for (;;) {
    }
}

typedef void (*vec_t)(void);
static void Reserved(void)
{
    Default_Handler();
}

__attribute__((section(".isr_vector"), used)) static const struct {
    const uint32_t *sp;
    vec_t handler[15];
} vectors = {
    &_estack,
    {Reset_Handler, Default_Handler, Default_Handler, Default_Handler, Default_Handler, Default_Handler,
     Reserved, Reserved, Reserved, Reserved, Default_Handler, Default_Handler, Reserved, Default_Handler,
     SysTick_Handler},
};

void semihost_exit(int code);

__attribute__((noreturn)) void Reset_Handler(void)
{
    uint32_t *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata)
        *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss; dst++)
        *dst = 0;
    *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20; /* CPACR: CP10/CP11 full access */
    __asm volatile("dsb\n isb");
    /* paint the stack below the current frame (keep 64 bytes of margin) */
    uint32_t sp;
    __asm volatile("mov %0, sp" : "=r"(sp));
    for (uint32_t *p = &_sstack; (uint32_t)p < sp - 64; p++)
        *p = STACK_PAINT;
    semihost_exit(main());
    for (;;) {
    }
}

/* deepest stack use so far, in bytes */
uint32_t stack_peak_bytes(void)
{
    const uint32_t *p = &_sstack;
    while (p < &_estack && *p == STACK_PAINT)
        p++;
    return (uint32_t)((uintptr_t)&_estack - (uintptr_t)p);
}
