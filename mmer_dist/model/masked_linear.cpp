// The mask-native linear on the CPU: out[t] = x[t] . W_g^T for every token t of group g, where
// W_g = round(theta_pre + m_g * tau*) is composed tile by tile in registers and never stored.
// Semantics and the reference loop it must equal: mmer_dist/model/masked_linear.py.
//
// Plain C ABI (no torch headers: it compiles in about a second) called through ctypes, which
// releases the GIL for the call. Built by mmer_dist/model/native.py with -O3 and, on x86 CPUs
// with AVX2 + FMA + F16C, the vector path below; elsewhere the scalar path computes the same
// values (it is the same arithmetic in the same order per lane, only not vectorised).
#include <stdint.h>
#include <string.h>

enum Dtype { F32 = 0, BF16 = 1, F16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float round_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u) return f;  // inf / nan: unchanged (tau* is finite)
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

template <int D> static inline float load1(const void* p, int64_t i) {
    if constexpr (D == F32) return ((const float*)p)[i];
    else if constexpr (D == BF16) return bf16_to_f32(((const uint16_t*)p)[i]);
    else return (float)((const _Float16*)p)[i];
}

template <int R> static inline float round1(float v) {
    if constexpr (R == BF16) return round_bf16(v);
    else if constexpr (R == F16) return (float)(_Float16)v;
    else return v;
}

// One row o of W_g, element k (composition in float32, then the one rounding).
template <int B, int TD, int R>
static inline float weight1(const void* base, const void* tau, const uint8_t* mrow, int64_t at, int64_t k) {
    float delta = ((mrow[k >> 3] >> (k & 7)) & 1) ? load1<TD>(tau, at + k) : 0.0f;
    return round1<R>(load1<B>(base, at + k) + delta);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MMER_VECTOR 1

template <int D> static inline __m256 load8(const void* p, int64_t i) {
    if constexpr (D == F32) return _mm256_loadu_ps((const float*)p + i);
    else if constexpr (D == BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i))), 16));
    else return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
}

template <int R> static inline __m256 round8(__m256 v) {
    if constexpr (R == BF16) {  // round_bf16 lane by lane (finite inputs)
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
        return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
    } else if constexpr (R == F16) {
        return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        return v;
    }
}

template <int O> static inline void store8(void* p, int64_t i, __m256 v) {  // v already rounded to O's precision
    if constexpr (O == F32) _mm256_storeu_ps((float*)p + i, v);
    else if constexpr (O == BF16) {
        __m256i high = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
        _mm_storeu_si128((__m128i*)((uint16_t*)p + i), packed);
    } else {
        _mm_storeu_si128((__m128i*)((uint16_t*)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// Tokens [t0, t0 + nt) (nt <= 4) of one group against row o: the weight row is composed once per
// 8 entries and used for every token of the block.
template <int B, int TD, int R>
static void row_block(const float* x, int64_t K, const void* base, const void* tau, const uint8_t* mrow, int64_t o,
                      int64_t t0, int nt, float* out, int64_t O) {
    const int64_t at = o * K;
    float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t k = 0;
#ifdef MMER_VECTOR
    // a rounded inf/nan lane would differ from round_bf16: tau* and theta_pre are finite (the merge
    // refuses non-finite inputs), so the vector rounding does not check
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float* x0 = x + t0 * K;
    for (; k + 8 <= K; k += 8) {
        __m256i byte = _mm256_set1_epi32(mrow[k >> 3]);
        __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit));
        __m256 w = round8<R>(_mm256_add_ps(load8<B>(base, at + k), _mm256_and_ps(keep, load8<TD>(tau, at + k))));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), w, a0);
        if (nt > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + K + k), w, a1);
        if (nt > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 2 * K + k), w, a2);
        if (nt > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 3 * K + k), w, a3);
    }
    sums[0] = hsum8(a0);
    sums[1] = hsum8(a1);
    sums[2] = hsum8(a2);
    sums[3] = hsum8(a3);
#endif
    for (; k < K; ++k) {  // the scalar path, and the vector path's last K % 8 entries
        float w = weight1<B, TD, R>(base, tau, mrow, at, k);
        for (int t = 0; t < nt; ++t) sums[t] += x[(t0 + t) * K + k] * w;
    }
    for (int t = 0; t < nt; ++t) out[(t0 + t) * O + o] = sums[t];
}

template <int B, int TD, int R>
static void masked_linear(const float* x, const void* base, const void* tau, const uint8_t* packed,
                          const int64_t* starts, const int64_t* stops, const int64_t* models, int64_t G,
                          int64_t O, int64_t K, float* out, int threads) {
    const int64_t KB = (K + 7) / 8;
    // rows are independent: each thread takes a contiguous range of rows and every group's tokens
    // against them, so a row of theta_pre and tau* is read from memory once per step
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; ++o) {
        for (int64_t g = 0; g < G; ++g) {
            const uint8_t* mrow = packed + (models[g] * O + o) * KB;
            for (int64_t t0 = starts[g]; t0 < stops[g]; t0 += 4) {
                int64_t left = stops[g] - t0;
                row_block<B, TD, R>(x, K, base, tau, mrow, o, t0, left < 4 ? (int)left : 4, out, O);
            }
        }
    }
}

// The dense path's matmul for bf16 / fp16 weights: out[t] = x[t] . W^T for tokens [t0, t1), each
// 8-entry tile of a row of W widened to float32 once per 4 tokens (torch's bf16 matmul on CPUs
// without bf16 instructions converts and packs the whole matrix per call: 2-4x slower at decode).
template <int B>
static void dense_linear(const float* x, const void* w, int64_t t0, int64_t t1, int64_t O, int64_t K, float* out,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; ++o) {
        const int64_t at = o * K;
        for (int64_t tb = t0; tb < t1; tb += 4) {
            const int nt = t1 - tb < 4 ? (int)(t1 - tb) : 4;
            float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int64_t k = 0;
#ifdef MMER_VECTOR
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const float* x0 = x + tb * K;
            for (; k + 8 <= K; k += 8) {
                __m256 wv = load8<B>(w, at + k);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), wv, a0);
                if (nt > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + K + k), wv, a1);
                if (nt > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 2 * K + k), wv, a2);
                if (nt > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 3 * K + k), wv, a3);
            }
            sums[0] = hsum8(a0);
            sums[1] = hsum8(a1);
            sums[2] = hsum8(a2);
            sums[3] = hsum8(a3);
#endif
            for (; k < K; ++k) {
                const float wk = load1<B>(w, at + k);
                for (int t = 0; t < nt; ++t) sums[t] += x[(tb + t) * K + k] * wk;
            }
            for (int t = 0; t < nt; ++t) out[(tb + t) * O + o] = sums[t];
        }
    }
}

template <int B, int TD>
static int by_rounding(int R, const float* x, const void* base, const void* tau, const uint8_t* packed,
                       const int64_t* starts, const int64_t* stops, const int64_t* models, int64_t G, int64_t O,
                       int64_t K, float* out, int threads) {
    switch (R) {
        case F32: masked_linear<B, TD, F32>(x, base, tau, packed, starts, stops, models, G, O, K, out, threads); return 0;
        case BF16: masked_linear<B, TD, BF16>(x, base, tau, packed, starts, stops, models, G, O, K, out, threads); return 0;
        case F16: masked_linear<B, TD, F16>(x, base, tau, packed, starts, stops, models, G, O, K, out, threads); return 0;
    }
    return 1;
}

template <int B>
static int by_tau(int TD, int R, const float* x, const void* base, const void* tau, const uint8_t* packed,
                  const int64_t* starts, const int64_t* stops, const int64_t* models, int64_t G, int64_t O, int64_t K,
                  float* out, int threads) {
    switch (TD) {
        case F32: return by_rounding<B, F32>(R, x, base, tau, packed, starts, stops, models, G, O, K, out, threads);
        case BF16: return by_rounding<B, BF16>(R, x, base, tau, packed, starts, stops, models, G, O, K, out, threads);
        case F16: return by_rounding<B, F16>(R, x, base, tau, packed, starts, stops, models, G, O, K, out, threads);
    }
    return 1;
}

template <int O> static inline void store1(void* p, int64_t i, float v) {  // v already rounded to O's precision
    if constexpr (O == F32) ((float*)p)[i] = v;
    else if constexpr (O == BF16) { uint32_t u; memcpy(&u, &v, 4); ((uint16_t*)p)[i] = (uint16_t)(u >> 16); }
    else ((_Float16*)p)[i] = (_Float16)v;
}

// theta_hat_i's rows [0, rows) of one block, written in the serving dtype: the slot build.
template <int B, int TD, int R, int OD>
static void compose_rows(const void* base, const void* tau, const uint8_t* packed, int64_t rows, int64_t K,
                         void* out, int threads) {
    const int64_t KB = (K + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < rows; ++o) {
        const uint8_t* mrow = packed + o * KB;
        const int64_t at = o * K;
        int64_t k = 0;
#ifdef MMER_VECTOR
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (; k + 8 <= K; k += 8) {
            __m256i byte = _mm256_set1_epi32(mrow[k >> 3]);
            __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit));
            store8<OD>(out, at + k, round8<R>(_mm256_add_ps(load8<B>(base, at + k), _mm256_and_ps(keep, load8<TD>(tau, at + k)))));
        }
#endif
        for (; k < K; ++k) store1<OD>(out, at + k, weight1<B, TD, R>(base, tau, mrow, at, k));
    }
}

#define MMER_DISPATCH3(CODE, NAME, ...)                                  \
    switch (CODE) {                                                     \
        case F32: { constexpr int NAME = F32; __VA_ARGS__; } break;     \
        case BF16: { constexpr int NAME = BF16; __VA_ARGS__; } break;   \
        case F16: { constexpr int NAME = F16; __VA_ARGS__; } break;     \
        default: return 1;                                              \
    }

extern "C" {

// out rows [t0, t1) = x rows [t0, t1) . W^T, W (O, K) in w_dtype; x, out float32 (T, K), (T, O).
int mmer_dense_linear(const float* x, const void* w, int w_dtype, int64_t t0, int64_t t1, int64_t O, int64_t K,
                      float* out, int threads) {
    MMER_DISPATCH3(w_dtype, B, dense_linear<B>(x, w, t0, t1, O, K, out, threads))
    return 0;
}

// theta_pre + m * tau* of one model's mask rows ``packed`` (rows, ceil(K / 8)), rounded to
// round_dtype, stored in out_dtype (rows, K): the values masked_linear multiplies. out_dtype is
// round_dtype or float32 (what a stage asks: it rounds to its compute dtype, or computes in
// float32). Returns 0, or 1 for a dtype code or pair it does not take.
int mmer_compose(const void* base, int base_dtype, const void* tau, int tau_dtype, const uint8_t* packed,
                 int64_t rows, int64_t K, int round_dtype, void* out, int out_dtype, int threads) {
    if (out_dtype != round_dtype && out_dtype != F32) return 1;
    const bool f32_out = out_dtype == F32;
    MMER_DISPATCH3(base_dtype, B, MMER_DISPATCH3(tau_dtype, TD, MMER_DISPATCH3(round_dtype, R,
        if (f32_out) compose_rows<B, TD, R, F32>(base, tau, packed, rows, K, out, threads);
        else compose_rows<B, TD, R, R>(base, tau, packed, rows, K, out, threads))))
    return 0;
}

// 1 when built with the vector path (for the benchmark's report).
int mmer_masked_linear_vectorized(void) {
#ifdef MMER_VECTOR
    return 1;
#else
    return 0;
#endif
}

// x (T, K) float32; base, tau (O, K) in base_dtype / tau_dtype; packed (N, O, ceil(K / 8)) uint8;
// group g = tokens [starts[g], stops[g]) through model models[g]'s mask; out (T, O) float32,
// rows of the groups' tokens written, others untouched. Returns 0, or 1 for an unknown dtype code.
int mmer_masked_linear(const float* x, const void* base, int base_dtype, const void* tau, int tau_dtype,
                       const uint8_t* packed, const int64_t* starts, const int64_t* stops, const int64_t* models,
                       int64_t G, int64_t O, int64_t K, int round_dtype, float* out, int threads) {
    switch (base_dtype) {
        case F32: return by_tau<F32>(tau_dtype, round_dtype, x, base, tau, packed, starts, stops, models, G, O, K, out, threads);
        case BF16: return by_tau<BF16>(tau_dtype, round_dtype, x, base, tau, packed, starts, stops, models, G, O, K, out, threads);
        case F16: return by_tau<F16>(tau_dtype, round_dtype, x, base, tau, packed, starts, stops, models, G, O, K, out, threads);
    }
    return 1;
}
}
