/* ch8fast: how arrays are stored, element by element.
 *
 * Every function works on float32 registers and bit patterns, with integer arithmetic or
 * exactly rounded float operations only, so the same source gives the same bits on every
 * instruction set (the kernels are built for baseline x86-64, AVX2 and AVX-512), and every
 * loop over them vectorizes: selects are masks (GCC will not if-convert a ternary holding a
 * floating-point operation), and nothing calls a library function.
 *
 *  - bfloat16 and float16 <-> float32: round to nearest even (RNE) or stochastic rounding
 *    (SR) with 16 random bits; NaN stays NaN (quiet, sign and top payload kept).
 *  - 8-bit state codes, a float32 scale per block of 256 elements: E4M3 (sign, 4 exponent
 *    bits, 3 mantissa bits) for signed state (first moments, velocities), rounded to
 *    nearest even; E5M3 (5 exponent bits, 3 mantissa bits, no sign) for accumulators of
 *    squares, rounded stochastically (nearest rounding would stall their decay: a 0.1 %
 *    shrink rounds back to the same code), and never to 0 for a value > 0.
 *  - one 32-bit random word per element, a hash of (per-step key, element index): the bits
 *    depend neither on the thread count nor on how the elements are split into calls.
 *
 * tests/reference.py restates each definition in NumPy; the kernels are checked against it
 * bit for bit.
 */
#ifndef CH8FAST_STORAGE_H
#define CH8FAST_STORAGE_H

#include <stdint.h>
#include <string.h>

static inline uint32_t ch8_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float ch8_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t ch8_sel(int c, uint32_t a, uint32_t b) {
    uint32_t m = 0u - (uint32_t)(c != 0);
    return (a & m) | (b & ~m);
}

/* ---- bfloat16 ------------------------------------------------------------------------ */

static inline float ch8_bf16_to_f32(uint16_t h) { return ch8_u2f((uint32_t)h << 16); }

static inline uint16_t ch8_bf16_rne(float x) {
    uint32_t u = ch8_f2u(x);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t q = (u >> 16) | 0x40u;                       /* NaN: quiet, payload kept */
    return (uint16_t)ch8_sel((u & 0x7fffffffu) > 0x7f800000u, q, r);
}

/* r16: 16 random bits. P(up) = (the 16 discarded bits) / 2^16 exactly. */
static inline uint16_t ch8_bf16_sr(float x, uint32_t r16) {
    uint32_t u = ch8_f2u(x);
    uint32_t r = (u + r16) >> 16;
    uint32_t q = (u >> 16) | 0x40u;
    return (uint16_t)ch8_sel((u & 0x7fffffffu) > 0x7f800000u, q, r);
}

/* ---- float16 ------------------------------------------------------------------------- */

static inline float ch8_f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t o = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t e = o & 0x0f800000u;
    uint32_t nrm = o + 0x38000000u;
    uint32_t inf = (o + 0x70000000u) | ch8_sel((o & 0x7fffffu) != 0, 0x00400000u, 0u);
    uint32_t sub = ch8_f2u(ch8_u2f(o + 0x38800000u) - 6.103515625e-05f);  /* renormalize */
    return ch8_u2f(ch8_sel(e == 0x0f800000u, inf, ch8_sel(e == 0, sub, nrm)) | sign);
}

static inline uint16_t ch8_f16_rne(float x) {
    uint32_t u = ch8_f2u(x);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t nrm = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;    /* rebias, RNE on bit 13 */
    uint32_t sub = ch8_f2u(ch8_u2f(a) + 0.5f) - 0x3f000000u;      /* the adder rounds to 2^-24 */
    uint32_t big = ch8_sel(a > 0x7f800000u, 0x7e00u | ((a >> 13) & 0x3ffu), 0x7c00u);
    return (uint16_t)(ch8_sel(a < 0x38800000u, sub, ch8_sel(a < 0x47800000u, nrm, big)) | sign);
}

/* Round to nearest even, saturating: a finite x past the largest finite value gives that
 * value (with x's sign) instead of an infinity. The 16-bit part of a "kahan" parameter:
 * its compensation then holds the rest, so theta = hi + lo stays finite and right. */
static inline uint16_t ch8_sat16(float x, uint16_t h, uint16_t inf_bits) {
    uint32_t a = ch8_f2u(x) & 0x7fffffffu;
    uint32_t over = (uint32_t)((h & 0x7fffu) == inf_bits) & (uint32_t)(a < 0x7f800000u);
    return (uint16_t)ch8_sel(over, (uint32_t)(h & 0x8000u) | (uint32_t)(inf_bits - 1u), h);
}
static inline uint16_t ch8_f16_rne_sat(float x) { return ch8_sat16(x, ch8_f16_rne(x), 0x7c00u); }
static inline uint16_t ch8_bf16_rne_sat(float x) { return ch8_sat16(x, ch8_bf16_rne(x), 0x7f80u); }

/* r16: 16 random bits. Normal range: 13 of them below the last kept bit, then truncate
 * (exact). Subnormal range (|x| < 2^-14, spacing 2^-24): up iff r16 < frac * 2^16. */
static inline uint16_t ch8_f16_sr(float x, uint32_t r16) {
    uint32_t u = ch8_f2u(x);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t nrm = ((a + (r16 >> 3)) >> 13) - 0x1C000u;
    nrm = ch8_sel(nrm > 0x7c00u, 0x7c00u, nrm);          /* >= 65536, or a carry past max */
    float t = ch8_u2f(ch8_sel(a < 0x38800000u, a, 0u)) * 16777216.0f;   /* exact */
    int32_t k = (int32_t)t;
    float p = (t - (float)k) * 65536.0f;                   /* exact */
    uint32_t sub = (uint32_t)k + (uint32_t)((float)(int32_t)r16 < p);
    uint32_t big = 0x7e00u | ((a >> 13) & 0x3ffu);
    return (uint16_t)(ch8_sel(a < 0x38800000u, sub, ch8_sel(a <= 0x7f800000u, nrm, big)) | sign);
}

/* ---- 8-bit block codes ----------------------------------------------------------------
 * A block of n <= 256 values x with s = max |x| (on the bit patterns, so a NaN wins) is
 * stored as s (float32) and one byte per value. Encoding: y = x * f, f = 0.9375f / s (the
 * largest code is 0.9375), then the byte of y; s == 0: every byte 0; s not finite: every
 * byte 0 and s NaN, so the block decodes to NaN. Decoding: x = raw(byte) * d with
 * d = s / 0.9375f.
 *
 * E4M3, signed: byte = sign | E << 3 | M; raw = (1 + M/8) 2^(E-16) for E >= 1, M 2^-18 for
 * E = 0; 0.9375 = E 15, M 7. Smallest positive: 4.1e-6 of the block's largest value.
 * E5M3, unsigned: byte = E << 3 | M; raw = (1 + M/8) 2^(E-32) for E >= 1, M 2^-34 for E = 0.
 * Smallest positive: 6.2e-11 of the block's largest value.
 */

#define CH8_QBLOCK 256

static inline float ch8_e4m3_decode(uint8_t b) {
    uint32_t e = ((uint32_t)b >> 3) & 15u, m = (uint32_t)b & 7u;
    uint32_t nrm = ((e + 111u) << 23) | (m << 20);
    uint32_t sub = ch8_f2u((float)(int32_t)m * 3.814697265625e-06f);       /* 2^-18 */
    return ch8_u2f(ch8_sel(e == 0, sub, nrm) | (((uint32_t)b & 0x80u) << 24));
}

static inline uint8_t ch8_e4m3_rne(float y) {
    uint32_t u = ch8_f2u(y), a = u & 0x7fffffffu;
    uint32_t nrm = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (111u << 3);
    uint32_t sub = ch8_f2u(ch8_u2f(a) + 32.0f) - 0x42000000u;   /* the adder rounds to 2^-18 */
    uint32_t c = ch8_sel(a >= (112u << 23), nrm, sub);
    c = ch8_sel(c > 127u, 127u, c);                 /* |y| a rounding above 0.9375 */
    return (uint8_t)(c | ((u >> 24) & 0x80u));
}

static inline float ch8_e5m3_decode(uint8_t b) {
    uint32_t e = (uint32_t)b >> 3, m = (uint32_t)b & 7u;
    uint32_t nrm = ((e + 95u) << 23) | (m << 20);
    uint32_t sub = ch8_f2u((float)(int32_t)m * 5.820766091346741e-11f);    /* 2^-34 */
    return ch8_u2f(ch8_sel(e == 0, sub, nrm));
}

/* y >= 0 (x * f); r16: 16 random bits. Normal range: r16 placed on the top 16 of the 20
 * discarded bits, then truncate; subnormal range (y < 2^-31, spacing 2^-34): up iff
 * r16 < frac 2^16. A value x != 0 never becomes byte 0, even when y underflowed. */
static inline uint8_t ch8_e5m3_sr(float y, uint32_t r16, float x) {
    uint32_t a = ch8_f2u(y) & 0x7fffffffu;
    uint32_t nrm = ((a + (r16 << 4)) >> 20) - (95u << 3);
    float t = ch8_u2f(ch8_sel(a < (96u << 23), a, 0u)) * 17179869184.0f;   /* 2^34, exact */
    int32_t k = (int32_t)t;
    float p = (t - (float)k) * 65536.0f;
    uint32_t sub = (uint32_t)k + (uint32_t)((float)(int32_t)r16 < p);
    uint32_t c = ch8_sel(a >= (96u << 23), nrm, sub);
    c = ch8_sel(c > 255u, 255u, c);
    c |= (uint32_t)((ch8_f2u(x) & 0x7fffffffu) != 0 && c == 0);
    return (uint8_t)c;
}

/* ---- random words ---------------------------------------------------------------------- */

static inline uint32_t ch8_fmix32(uint32_t x) {
    x ^= x >> 16; x *= 0x85ebca6bu; x ^= x >> 13; x *= 0xc2b2ae35u; x ^= x >> 16;
    return x;
}

static inline uint64_t ch8_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The key of one step of one group: mix64(mix64(mix64(seed) + group) + step). */
static inline uint64_t ch8_step_key(uint64_t seed, uint64_t group, uint64_t step) {
    return ch8_mix64(ch8_mix64(ch8_mix64(seed) + group) + step);
}

/* The random word of element i (its index in the group's concatenation, modulo 2^32):
 * low 16 bits for the parameter's rounding, high 16 bits for the state's. fmix32 is a
 * bijection with full avalanche, so over steps (random keys) each element's word is
 * uniform, and within a step distinct elements get distinct, unrelated words. */
static inline uint32_t ch8_word(uint64_t key, uint32_t i) {
    return ch8_fmix32(i ^ (uint32_t)key) ^ (uint32_t)(key >> 32);
}

#endif
