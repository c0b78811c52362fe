/* Divisive normalization along rows, forward and backward (included by rows.c).
 *
 * DivisiveNorm1d (and DN on (N, 1, H, W) with windows along W only) normalizes each row
 * x of n values by local windows of radius a (mean) and b (variance), cut at the row's
 * ends and averaged over the values they cover:
 *
 *   m_j = box_a(x)_j / cnt_a(j),   v = x - m,   q_j = box_b(v^2)_j / cnt_b(j),
 *   r = (q + s)^(-1/2)   (s = sigma^2 + eps),   y = v r,
 *
 * with box_w(t)_j = sum of t_i over |i - j| <= w, 0 <= i < n, and cnt_w(j) = box_w(1)_j.
 * The backward, for dy and g = dL/d(sum |v|) (the C = 1 case of normswap's
 * DivisiveNormFn; a centred box sum is its own adjoint):
 *
 *   dq = -r^3 / 2 dy v,   c = 2 box_b(dq / cnt_b),   dv = dy r + c v + g sign(v),
 *   dx = dv - box_a(dv / cnt_a),   and sum(dq) for dL/dsigma = 2 sigma sum(dq).
 *
 * The forward keeps nothing but x: the backward computes m, v and r again (two more box
 * sums on a row that is in cache), so the layer saves what nn.LayerNorm saves. A box sum
 * of radius w > DN_DIRECT_MAX is the difference of two prefix sums, sp[j + 2w + 1] - sp[j]
 * on a padded prefix array, two operations per value whatever the width (a window of 61
 * units is DivisiveNorm1d's default); narrower windows are summed directly, as the PyTorch
 * formulation sums them (no cancellation between long sums: a window far from a huge or
 * non-finite value does not see it). Everything is computed in double precision. In
 * PyTorch these are about 40 calls per layer and step on float64 copies of the input.
 * Rows are split between OpenMP threads; the sums over rows (sum |v|, sum dq) are added in
 * row order after the parallel loop, so every result depends on the inputs alone.
 */

/* Prefix sums: sp[0 .. w] = 0, sp[w + 1 + i] = t_0 + ... + t_i, sp[n + w + 1 .. n + 2 w] = the
 * total, so that box_w(t)_j = sp[j + 2 w + 1] - sp[j]; t of type T_, the sums in double. With
 * AVX-512 eight values at a time (an in-register scan of three shifted adds, then the
 * running total), with AVX2 four (two shifted adds), else one at a time. A scan is one chain
 * of additions; here one addition per eight (four) values is on it. */
#if defined(__AVX512F__)
#define DN_LOAD8_f32(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define DN_LOAD8_f64(p) _mm512_loadu_pd(p)
#define DN_PREFIX_SIMD(SUF_)                                                                   \
    const __m512i by1 = _mm512_set_epi64(6, 5, 4, 3, 2, 1, 0, 0);                              \
    const __m512i by2 = _mm512_set_epi64(5, 4, 3, 2, 1, 0, 0, 0);                              \
    const __m512i by4 = _mm512_set_epi64(3, 2, 1, 0, 0, 0, 0, 0);                              \
    const __m512i last = _mm512_set1_epi64(7);                                                 \
    __m512d carry = _mm512_setzero_pd();                                                       \
    for (; i + 8 <= n; i += 8) {                                                               \
        __m512d v = DN_LOAD8_##SUF_(t + i);                                                    \
        v = _mm512_add_pd(v, _mm512_maskz_permutexvar_pd(0xFE, by1, v));                       \
        v = _mm512_add_pd(v, _mm512_maskz_permutexvar_pd(0xFC, by2, v));                       \
        v = _mm512_add_pd(v, _mm512_maskz_permutexvar_pd(0xF0, by4, v));                       \
        _mm512_storeu_pd(s + i, _mm512_add_pd(v, carry));                                      \
        /* the next carry is the stored s[i + 7]: same operands, same rounding */              \
        carry = _mm512_add_pd(carry, _mm512_permutexvar_pd(last, v));                          \
    }                                                                                          \
    if (i) acc = s[i - 1];
#elif defined(__AVX2__)
#include <immintrin.h>
#define DN_LOAD4_f32(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define DN_LOAD4_f64(p) _mm256_loadu_pd(p)
#define DN_PREFIX_SIMD(SUF_)                                                                   \
    const __m256d zero4 = _mm256_setzero_pd();                                                 \
    __m256d carry = zero4;                                                                     \
    for (; i + 4 <= n; i += 4) {                                                               \
        __m256d v = DN_LOAD4_##SUF_(t + i);                                                    \
        /* (0, v0, v1, v2), then (0, 0, v0', v1') */                                           \
        v = _mm256_add_pd(v, _mm256_blend_pd(_mm256_permute4x64_pd(v, 0x90), zero4, 0x1));     \
        v = _mm256_add_pd(v, _mm256_blend_pd(_mm256_permute4x64_pd(v, 0x40), zero4, 0x3));     \
        _mm256_storeu_pd(s + i, _mm256_add_pd(v, carry));                                      \
        carry = _mm256_add_pd(carry, _mm256_permute4x64_pd(v, 0xFF));                          \
    }                                                                                          \
    if (i) acc = s[i - 1];
#else
#define DN_PREFIX_SIMD(SUF_)
#endif

#define DN_DIRECT_MAX 4   /* radii up to this are summed directly (windows up to 9 wide) */

/* box_w(t)_j = hi[j] - lo[j]: for w <= DN_DIRECT_MAX hi = the sums, computed directly into
 * box, and lo = zero (n zeros); else hi and lo point into the prefix sums in sp (n + 2 w + 1
 * values), read by the caller without another pass */
typedef struct { const double *hi, *lo; } dn_box_t;

#define DN_BOX(T_, SUF_)                                                                       \
static dn_box_t dn_box_##SUF_(const T_ *restrict t, int64_t n, int64_t w, double *restrict sp, \
                              double *restrict box, const double *zero) {                      \
    if (w <= DN_DIRECT_MAX) { /* t zero-padded in sp, then 2 w + 1 values a position */      \
        for (int64_t i = 0; i < w; i++) sp[i] = sp[n + w + i] = 0;                             \
        for (int64_t i = 0; i < n; i++) sp[w + i] = (double)t[i];                              \
        switch (w) {                                                                           \
        case 0:                                                                                \
            for (int64_t j = 0; j < n; j++) box[j] = sp[j];                                    \
            break;                                                                             \
        case 1:                                                                                \
            for (int64_t j = 0; j < n; j++) box[j] = sp[j] + sp[j + 1] + sp[j + 2];            \
            break;                                                                             \
        case 2:                                                                                \
            for (int64_t j = 0; j < n; j++)                                                    \
                box[j] = sp[j] + sp[j + 1] + sp[j + 2] + sp[j + 3] + sp[j + 4];                \
            break;                                                                             \
        case 3:                                                                                \
            for (int64_t j = 0; j < n; j++)                                                    \
                box[j] = sp[j] + sp[j + 1] + sp[j + 2] + sp[j + 3] + sp[j + 4] + sp[j + 5]     \
                         + sp[j + 6];                                                          \
            break;                                                                             \
        default: /* 4 */                                                                       \
            for (int64_t j = 0; j < n; j++)                                                    \
                box[j] = sp[j] + sp[j + 1] + sp[j + 2] + sp[j + 3] + sp[j + 4] + sp[j + 5]     \
                         + sp[j + 6] + sp[j + 7] + sp[j + 8];                                  \
            break;                                                                             \
        }                                                                                      \
        return (dn_box_t){box, zero};                                                          \
    }                                                                                          \
    for (int64_t i = 0; i <= w; i++) sp[i] = 0;                                                \
    double *s = sp + w + 1, acc = 0;                                                           \
    int64_t i = 0;                                                                             \
    DN_PREFIX_SIMD(SUF_)                                                                       \
    for (; i < n; i++) {                                                                       \
        acc += (double)t[i];                                                                   \
        s[i] = acc;                                                                            \
    }                                                                                          \
    for (int64_t j = 0; j < w; j++) s[n + j] = acc;                                            \
    return (dn_box_t){sp + 2 * w + 1, sp};                                                     \
}
DN_BOX(float, f32)
DN_BOX(double, f64)
#undef DN_BOX
#undef DN_PREFIX_SIMD

/* 1 / cnt_w(j) for j < n (w < n) */
static void dn_inverse_counts(int64_t n, int64_t w, double *inv) {
    for (int64_t j = 0; j < n; j++) {
        int64_t hi = j + w < n - 1 ? j + w : n - 1, lo = j - w > 0 ? j - w : 0;
        inv[j] = 1.0 / (double)(hi - lo + 1);
    }
}

/* Per element type T_: RSQRT_(q) = 1 / sqrt(q) in T_'s precision (for float rows a double
 * square root and division cost about four times as much and were half the forward's
 * time; the output has float precision anyway).
 *
 * dn_centre: v = x - m, returns box_b(v^2) (vv a scratch row).
 * dn_forward_row: y = v r into y, returns sum |v|.
 * dn_backward_row: dx into dx, returns sum dq; r, t and dv are scratch rows. */
#define NS_DIVISIVE(T_, SUF_, RSQRT_)                                                                \
static dn_box_t dn_centre_##SUF_(const T_ *restrict x, int64_t n, int64_t a, int64_t b,                  \
                             const double *restrict ia, double *restrict sp, double *restrict box,   \
                             const double *zero, double *restrict v, double *restrict vv) {          \
    dn_box_t m = dn_box_##SUF_(x, n, a, sp, box, zero);                                              \
    for (int64_t j = 0; j < n; j++) {                                                                \
        v[j] = (double)x[j] - (m.hi[j] - m.lo[j]) * ia[j];                                           \
        vv[j] = v[j] * v[j];                                                                         \
    }                                                                                                \
    return dn_box_f64(vv, n, b, sp, box, zero);                                                      \
}                                                                                                    \
                                                                                                     \
static double dn_forward_row_##SUF_(const T_ *restrict x, int64_t n, int64_t a, int64_t b, double s, \
                                    const double *restrict ia, const double *restrict ib,            \
                                    double *restrict sp, double *restrict box, const double *zero,   \
                                    double *restrict v, double *restrict vv, T_ *restrict y) {       \
    dn_box_t q = dn_centre_##SUF_(x, n, a, b, ia, sp, box, zero, v, vv);                             \
    double abs_sum = 0;                                                                              \
    _Pragma("omp simd reduction(+:abs_sum)")                                                         \
    for (int64_t j = 0; j < n; j++) {                                                                \
        double r = RSQRT_((q.hi[j] - q.lo[j]) * ib[j] + s);                                          \
        y[j] = (T_)(v[j] * r);                                                                       \
        abs_sum += fabs(v[j]);                                                                       \
    }                                                                                                \
    return abs_sum;                                                                                  \
}                                                                                                    \
                                                                                                     \
static double dn_backward_row_##SUF_(const T_ *restrict x, const T_ *restrict dy, int64_t n,         \
                                     int64_t a, int64_t b, double s, double g,                       \
                                     const double *restrict ia, const double *restrict ib,           \
                                     double *restrict sp, double *restrict box, const double *zero,  \
                                     double *restrict v, double *restrict r, double *restrict t,     \
                                     double *restrict dv, T_ *restrict dx) {                         \
    dn_box_t q = dn_centre_##SUF_(x, n, a, b, ia, sp, box, zero, v, t);                              \
    double dq_sum = 0;                                                                               \
    _Pragma("omp simd reduction(+:dq_sum)")                                                          \
    for (int64_t j = 0; j < n; j++) {                                                                \
        r[j] = RSQRT_((q.hi[j] - q.lo[j]) * ib[j] + s);                                              \
        double dq = -0.5 * r[j] * r[j] * r[j] * (double)dy[j] * v[j];                                \
        dq_sum += dq;                                                                                \
        t[j] = dq * ib[j];                                                                           \
    }                                                                                                \
    dn_box_t c2 = dn_box_f64(t, n, b, sp, box, zero);                                                \
    for (int64_t j = 0; j < n; j++) {                                                                \
        double c = 2.0 * (c2.hi[j] - c2.lo[j]);                                                      \
        dv[j] = (double)dy[j] * r[j] + c * v[j] + g * (double)SIGN(v[j]);                            \
        t[j] = dv[j] * ia[j];                                                                        \
    }                                                                                                \
    dn_box_t ma = dn_box_f64(t, n, a, sp, box, zero);                                                \
    for (int64_t j = 0; j < n; j++) dx[j] = (T_)(dv[j] - (ma.hi[j] - ma.lo[j]));                     \
    return dq_sum;                                                                                   \
}                                                                                                    \
                                                                                                     \
/* Both directions: dy == NULL: the forward (y into out, sum |v| into *total), else the             \
 * backward (dx into out, sum dq into *total); total may be NULL. -1: out of memory. */              \
int ns_dn_rows_##SUF_(const T_ *x, const T_ *dy, int64_t rows, int64_t n, int64_t a, int64_t b,      \
                      double s, double g, T_ *out, double *total, int threads) {                    \
    if (n < 1 || rows < 1) {                                                                         \
        if (total) *total = 0;                                                                       \
        return 0;                                                                                    \
    }                                                                                                \
    if (a > n - 1) a = n - 1;                                                                        \
    if (b > n - 1) b = n - 1;                                                                        \
    int64_t w = a > b ? a : b;                                                                       \
    double *ia = (double *)calloc((size_t)(3 * n), sizeof(double)); /* 1/cnt_a, 1/cnt_b, zeros */   \
    double *per_row = (double *)malloc(sizeof(double) * (size_t)rows);                               \
    int failed = !ia || !per_row;                                                                    \
    if (!failed) {                                                                                   \
        double *ib = ia + n;                                                                         \
        const double *zero = ia + 2 * n;                                                             \
        dn_inverse_counts(n, a, ia);                                                                 \
        dn_inverse_counts(n, b, ib);                                                                 \
        _Pragma("omp parallel num_threads(threads)")                                                 \
        {                                                                                            \
            int64_t ld = n + 20; /* rows not a multiple of 4 KiB apart (store-load aliasing) */      \
            double *v = (double *)ns_thread_scratch(sizeof(double) * (size_t)(5 * ld + n + 2 * w + 1), \
                                                    0, &failed);                                     \
            double *r = v + ld, *t = r + ld, *dv = t + ld, *box = dv + ld, *sp = box + ld;           \
            _Pragma("omp for schedule(static)")                                                      \
            for (int64_t row = 0; row < rows; row++) {                                               \
                if (!v) continue;                                                                    \
                if (dy)                                                                              \
                    per_row[row] = dn_backward_row_##SUF_(x + row * n, dy + row * n, n, a, b, s, g,  \
                                                          ia, ib, sp, box, zero, v, r, t, dv,        \
                                                          out + row * n);                            \
                else                                                                                 \
                    per_row[row] = dn_forward_row_##SUF_(x + row * n, n, a, b, s, ia, ib, sp, box,   \
                                                         zero, v, t, out + row * n);                 \
            }                                                                                        \
            free(v);                                                                                 \
        }                                                                                            \
        if (!failed && total) {                                                                      \
            double sum = 0;                                                                          \
            for (int64_t row = 0; row < rows; row++) sum += per_row[row];                            \
            *total = sum;                                                                            \
        }                                                                                            \
    }                                                                                                \
    free(ia);                                                                                        \
    free(per_row);                                                                                   \
    return failed ? -1 : 0;                                                                          \
}

#define DN_RSQRT_f32(q) ((double)(1.0f / sqrtf((float)(q))))
#define DN_RSQRT_f64(q) (1.0 / sqrt(q))
NS_DIVISIVE(float, f32, DN_RSQRT_f32)
NS_DIVISIVE(double, f64, DN_RSQRT_f64)
#undef NS_DIVISIVE
#undef DN_RSQRT_f32
#undef DN_RSQRT_f64
