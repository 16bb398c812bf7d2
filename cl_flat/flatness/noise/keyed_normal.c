/* out = base + Z*S (add) or Z*S, Z the counter-based N(0, 1) of keyed_normal.py (one formula in
 * both places; tests/unit/test_noise.py checks both against hand-computed values).
 * S = factor[r * factor_step] per row r, times |base| if elementwise. Rows are split over the
 * caller's OpenMP threads (torch's own libgomp, so no second thread pool); columns vectorise. */
#include <math.h>
#include <stdint.h>

static inline float keyed_z(uint64_t key, uint64_t i) {
    uint64_t x = key + (i + 1) * 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    x ^= x >> 31;
    /* both are < 2^24: through int32 the conversion vectorises (AVX2 has no int64 -> float) */
    float u1 = ((float)(int32_t)(x >> 40) + 0.5f) * 0x1p-24f;
    float u2 = (float)(int32_t)(x & 0xFFFFFF) * 0x1p-24f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958648f * u2);
}

static inline float bf16_load(uint16_t v) {
    union { uint32_t u; float f; } b = { (uint32_t)v << 16 };
    return b.f;
}

static inline uint16_t bf16_store(float f) {  /* round to nearest even (weights are finite) */
    union { float f; uint32_t u; } b = { f };
    return (uint16_t)((b.u + 0x7FFFu + ((b.u >> 16) & 1u)) >> 16);
}

/* The flags are compile-time constants in each _row call below: a branch (or a load of base that
 * may be absent) inside the loop keeps gcc from vectorising it, which made the kernel 4x slower. */
#define KEYED_KERNEL(NAME, T, LOAD, STORE)                                                        \
static inline __attribute__((always_inline)) void NAME##_row(                                     \
        const T *base, T *out, int64_t o, int64_t cols, uint64_t key, float s,                    \
        const int has_base, const int elementwise, const int add) {                               \
    _Pragma("omp simd")                                                                           \
    for (int64_t c = 0; c < cols; c++) {                                                          \
        float w = has_base ? LOAD(base[o + c]) : 0.0f;                                            \
        float e = keyed_z(key, (uint64_t)(o + c)) * (elementwise ? s * fabsf(w) : s);             \
        out[o + c] = STORE(add ? w + e : e);                                                      \
    }                                                                                             \
}                                                                                                 \
void NAME(const T *base, T *out, int64_t rows, int64_t cols, uint64_t key, const float *factor,  \
          int64_t factor_step, int elementwise, int add) {                                       \
    const int mode = (base != 0) * 4 + (elementwise != 0) * 2 + (add != 0);                       \
    _Pragma("omp parallel for schedule(static) if (rows * cols > 32768)")                        \
    for (int64_t r = 0; r < rows; r++) {                                                          \
        const float s = factor[r * factor_step];                                                  \
        const int64_t o = r * cols;                                                               \
        switch (mode) {                                                                           \
            case 7: NAME##_row(base, out, o, cols, key, s, 1, 1, 1); break;                       \
            case 6: NAME##_row(base, out, o, cols, key, s, 1, 1, 0); break;                       \
            case 5: NAME##_row(base, out, o, cols, key, s, 1, 0, 1); break;                       \
            case 4: NAME##_row(base, out, o, cols, key, s, 1, 0, 0); break;                       \
            case 3: NAME##_row(base, out, o, cols, key, s, 0, 1, 1); break;                       \
            case 2: NAME##_row(base, out, o, cols, key, s, 0, 1, 0); break;                       \
            case 1: NAME##_row(base, out, o, cols, key, s, 0, 0, 1); break;                       \
            default: NAME##_row(base, out, o, cols, key, s, 0, 0, 0); break;                      \
        }                                                                                         \
    }                                                                                             \
}

#define F32_IDENTITY(x) (x)
KEYED_KERNEL(keyed_gaussian_f32, float, F32_IDENTITY, F32_IDENTITY)
KEYED_KERNEL(keyed_gaussian_bf16, uint16_t, bf16_load, bf16_store)
