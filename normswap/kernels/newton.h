/* IterNorm's Newton iteration for a batch of small covariance matrices, forward and
 * backward (included by rows.c).
 *
 * For each of G matrices Sigma (d x d, row-major, symmetric positive definite):
 *
 *   S = Sigma / tr(Sigma),  P_1 = (3 I - S) / 2,  P_k = (3 P_{k-1} - P_{k-1}^3 S) / 2,
 *   out = P_T / sqrt(tr(Sigma))                                    (T = 0: out = I / sqrt(tr))
 *
 * The backward takes dL/dout and returns dL/dSigma by the chain rule through the steps,
 * recomputing them (the same formulas as normswap.norms.whitening's PyTorch version):
 * for P' = (3 P - P^3 S) / 2 and G = dL/dP',
 *
 *   dL/dS += -1/2 (P^3)^T G,   H = -1/2 G S^T,   dL/dP = 3/2 G + H (P^2)^T + P^T H P^T + (P^2)^T H.
 *
 * S and every P_k (a polynomial in S) are symmetric, so the transposes are left out:
 * dL/dS += -1/2 P^3 G, H = -1/2 G S, dL/dP = 3/2 G + H P^2 + P H P + P^2 H (the computed
 * P^3 and P_k differ from their transposes by rounding only; transposing them cost 40% of
 * the backward's time).
 *
 * Computed in the input's precision, as the PyTorch version is (d is small: a product is
 * d^3 multiply-adds); one matrix per OpenMP iteration, on `threads` threads. In PyTorch
 * these are about 15 (forward) and 45 (backward) calls per layer and step, whose dispatch
 * costs more than their arithmetic: resnet18's 20 IterNorm layers (one thread) spend
 * 12.2 ms a step in them, 2.6 ms here (6.0 ms computing in double precision).
 */

/* C = A B for 16 x 16 row-major matrices (IterNorm's default group) in registers, so that
 * several rows' chains of multiply-adds overlap: with AVX-512, float: eight rows of one
 * vector each at a time; double: four rows of two vectors; with AVX2 and FMA, below.
 * Returns 0 where not compiled (the caller then takes the generic loop). */
#if defined(__AVX512F__)
static int nt_mm16_f32(const float *restrict A, const float *restrict B, float *restrict C) {
    for (int i = 0; i < 16; i += 8) {
        __m512 c[8];
        for (int r = 0; r < 8; r++) c[r] = _mm512_setzero_ps();
        for (int k = 0; k < 16; k++) {
            const __m512 b = _mm512_loadu_ps(B + k * 16);
            for (int r = 0; r < 8; r++) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(A[(i + r) * 16 + k]), b, c[r]);
        }
        for (int r = 0; r < 8; r++) _mm512_storeu_ps(C + (i + r) * 16, c[r]);
    }
    return 1;
}

static int nt_mm16_f64(const double *restrict A, const double *restrict B, double *restrict C) {
    for (int i = 0; i < 16; i += 4) {
        __m512d lo[4], hi[4];
        for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm512_setzero_pd();
        for (int k = 0; k < 16; k++) {
            const __m512d bl = _mm512_loadu_pd(B + k * 16), bh = _mm512_loadu_pd(B + k * 16 + 8);
            for (int r = 0; r < 4; r++) {
                const __m512d a = _mm512_set1_pd(A[(i + r) * 16 + k]);
                lo[r] = _mm512_fmadd_pd(a, bl, lo[r]);
                hi[r] = _mm512_fmadd_pd(a, bh, hi[r]);
            }
        }
        for (int r = 0; r < 4; r++) {
            _mm512_storeu_pd(C + (i + r) * 16, lo[r]);
            _mm512_storeu_pd(C + (i + r) * 16 + 8, hi[r]);
        }
    }
    return 1;
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* with AVX2: float, four rows of two vectors at a time; double, two rows of four */
static int nt_mm16_f32(const float *restrict A, const float *restrict B, float *restrict C) {
    for (int i = 0; i < 16; i += 4) {
        __m256 lo[4], hi[4];
        for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_ps();
        for (int k = 0; k < 16; k++) {
            __m256 bl = _mm256_loadu_ps(B + k * 16), bh = _mm256_loadu_ps(B + k * 16 + 8);
            NS_IN_REGISTER(bl);
            NS_IN_REGISTER(bh);
            for (int r = 0; r < 4; r++) {
                const __m256 a = _mm256_set1_ps(A[(i + r) * 16 + k]);
                lo[r] = _mm256_fmadd_ps(a, bl, lo[r]);
                hi[r] = _mm256_fmadd_ps(a, bh, hi[r]);
            }
        }
        for (int r = 0; r < 4; r++) {
            _mm256_storeu_ps(C + (i + r) * 16, lo[r]);
            _mm256_storeu_ps(C + (i + r) * 16 + 8, hi[r]);
        }
    }
    return 1;
}

static int nt_mm16_f64(const double *restrict A, const double *restrict B, double *restrict C) {
    for (int i = 0; i < 16; i += 2) {
        __m256d c[2][4];
        for (int r = 0; r < 2; r++)
            for (int q = 0; q < 4; q++) c[r][q] = _mm256_setzero_pd();
        for (int k = 0; k < 16; k++) {
            __m256d b[4];
            for (int q = 0; q < 4; q++) {
                b[q] = _mm256_loadu_pd(B + k * 16 + 4 * q);
                NS_IN_REGISTER(b[q]);
            }
            for (int r = 0; r < 2; r++) {
                const __m256d a = _mm256_set1_pd(A[(i + r) * 16 + k]);
                for (int q = 0; q < 4; q++) c[r][q] = _mm256_fmadd_pd(a, b[q], c[r][q]);
            }
        }
        for (int r = 0; r < 2; r++)
            for (int q = 0; q < 4; q++) _mm256_storeu_pd(C + (i + r) * 16 + 4 * q, c[r][q]);
    }
    return 1;
}
#else
static int nt_mm16_f32(const float *A, const float *B, float *C) { (void)A; (void)B; (void)C; return 0; }
static int nt_mm16_f64(const double *A, const double *B, double *C) { (void)A; (void)B; (void)C; return 0; }
#endif

/* scratch values per thread, in d x d matrices: the forward uses S, p and the steps
 * (3 (T - 1)); the backward five more (gp, gs, h, t1, t2) */
static int64_t nt_scratch(int64_t d, int T) { return (int64_t)(3 * (T > 1 ? T - 1 : 0) + 7) * d * d; }

#define NS_NEWTON(T_, SUF_)                                                                         \
/* C = A B for d x d row-major matrices (the inner loop along C's and B's rows: vectors) */         \
static void nt_mm_##SUF_(const T_ *restrict A, const T_ *restrict B, T_ *restrict C, int64_t d) {   \
    if (d == 16 && nt_mm16_##SUF_(A, B, C)) return;                                                 \
    for (int64_t i = 0; i < d; i++) {                                                               \
        T_ *restrict c = C + i * d;                                                                 \
        for (int64_t j = 0; j < d; j++) c[j] = 0;                                                   \
        for (int64_t k = 0; k < d; k++) {                                                           \
            const T_ a = A[i * d + k];                                                              \
            const T_ *restrict b = B + k * d;                                                       \
            for (int64_t j = 0; j < d; j++) c[j] += a * b[j];                                       \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
/* tr(Sigma), S = Sigma / tr and the steps: P_k into steps[3 (k - 1)] for k = 1..T-1 with           \
 * P_k^2, P_k^3 after it, P_T into p. Returns tr. */                                                \
static T_ nt_steps_##SUF_(const T_ *cov, int64_t d, int T, T_ *S, T_ *steps, T_ *p) {               \
    int64_t dd = d * d;                                                                             \
    T_ tr = 0;                                                                                      \
    for (int64_t i = 0; i < d; i++) tr += cov[i * d + i];                                           \
    for (int64_t i = 0; i < dd; i++) S[i] = cov[i] / tr;                                            \
    for (int64_t i = 0; i < dd; i++) p[i] = T >= 1 ? (T_)-0.5 * S[i] : 0;                           \
    for (int64_t i = 0; i < d; i++) p[i * d + i] += T >= 1 ? (T_)1.5 : (T_)1;                       \
    for (int s = 0; s + 1 < T; s++) {                                                               \
        T_ *P = steps + 3 * s * dd, *PP = P + dd, *PPP = PP + dd;                                   \
        for (int64_t i = 0; i < dd; i++) P[i] = p[i];                                               \
        nt_mm_##SUF_(P, P, PP, d);                                                                  \
        nt_mm_##SUF_(PP, P, PPP, d);                                                                \
        nt_mm_##SUF_(PPP, S, p, d);                                                                 \
        for (int64_t i = 0; i < dd; i++) p[i] = (T_)1.5 * P[i] - (T_)0.5 * p[i];                    \
    }                                                                                               \
    return tr;                                                                                      \
}                                                                                                   \
                                                                                                    \
/* one matrix: P_T / sqrt(tr) of cov into out; w: nt_scratch(d, T) values */                        \
static void nt_forward_one_##SUF_(const T_ *cov, const T_ *grad, int64_t d, int T, T_ *out, T_ *w) { \
    (void)grad;                                                                                     \
    int64_t dd = d * d;                                                                             \
    T_ *S = w, *p = S + dd, *steps = p + dd;                                                        \
    T_ rs = (T_)1 / SQRT_(nt_steps_##SUF_(cov, d, T, S, steps, p));                                 \
    for (int64_t i = 0; i < dd; i++) out[i] = p[i] * rs;                                            \
}                                                                                                   \
                                                                                                    \
/* one matrix: dL/dSigma into dcov for dL/dout = gr; w: nt_scratch(d, T) values */                  \
static void nt_backward_one_##SUF_(const T_ *c, const T_ *gr, int64_t d, int T, T_ *dcov, T_ *w) {  \
    int64_t dd = d * d;                                                                             \
    T_ *S = w, *p = S + dd, *gp = p + dd, *gs = gp + dd, *h = gs + dd,                              \
       *t1 = h + dd, *t2 = t1 + dd, *steps = t2 + dd;                                               \
    T_ tr = nt_steps_##SUF_(c, d, T, S, steps, p), rs = (T_)1 / SQRT_(tr);                          \
    T_ gtr = 0;                                                                                     \
    for (int64_t i = 0; i < dd; i++) {                                                              \
        gp[i] = gr[i] * rs;                                                                         \
        gtr += gr[i] * p[i];                                                                        \
        gs[i] = 0;                                                                                  \
    }                                                                                               \
    gtr = (T_)-0.5 * gtr * rs / tr;                                                                 \
    for (int s = T - 2; s >= 0; s--) {                                                              \
        const T_ *P = steps + 3 * s * dd, *PP = P + dd, *PPP = PP + dd;                             \
        nt_mm_##SUF_(PPP, gp, t1, d);                                                               \
        for (int64_t i = 0; i < dd; i++) gs[i] -= (T_)0.5 * t1[i];                                  \
        nt_mm_##SUF_(gp, S, h, d);                                                                  \
        for (int64_t i = 0; i < dd; i++) h[i] *= (T_)-0.5;                                          \
        for (int64_t i = 0; i < dd; i++) gp[i] *= (T_)1.5;                                          \
        nt_mm_##SUF_(h, PP, t1, d);                                                                 \
        for (int64_t i = 0; i < dd; i++) gp[i] += t1[i];                                            \
        nt_mm_##SUF_(P, h, t2, d);                                                                  \
        nt_mm_##SUF_(t2, P, t1, d);                                                                 \
        for (int64_t i = 0; i < dd; i++) gp[i] += t1[i];                                            \
        nt_mm_##SUF_(PP, h, t1, d);                                                                 \
        for (int64_t i = 0; i < dd; i++) gp[i] += t1[i];                                            \
    }                                                                                               \
    if (T >= 1)                                                                                     \
        for (int64_t i = 0; i < dd; i++) gs[i] -= (T_)0.5 * gp[i];                                  \
    T_ sgc = 0;                                                                                     \
    for (int64_t i = 0; i < dd; i++) sgc += gs[i] * c[i];                                           \
    gtr -= sgc / (tr * tr);                                                                         \
    for (int64_t i = 0; i < dd; i++)                                                                \
        dcov[i] = gs[i] / tr + (i % (d + 1) == 0 ? gtr : (T_)0);                                    \
}                                                                                                   \
                                                                                                    \
/* `one` for each of the G matrices (grad may be NULL), one per OpenMP iteration, each              \
 * thread with its own scratch; -1 when that cannot be allocated */                                 \
static int nt_each_##SUF_(void (*one)(const T_ *, const T_ *, int64_t, int, T_ *, T_ *),            \
                          const T_ *cov, const T_ *grad, int64_t G, int64_t d, int T, T_ *out,      \
                          int threads) {                                                            \
    int64_t dd = d * d;                                                                             \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(threads)")                                                    \
    {                                                                                               \
        T_ *w = (T_ *)ns_thread_scratch(sizeof(T_) * (size_t)nt_scratch(d, T), 0, &failed);         \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t g = 0; g < G; g++)                                                             \
            if (w) one(cov + g * dd, grad ? grad + g * dd : NULL, d, T, out + g * dd, w);           \
        free(w);                                                                                    \
    }                                                                                               \
    return failed ? -1 : 0;                                                                         \
}                                                                                                   \
                                                                                                    \
int ns_newton_forward_##SUF_(const T_ *cov, int64_t G, int64_t d, int T, T_ *out, int threads) {    \
    return nt_each_##SUF_(nt_forward_one_##SUF_, cov, NULL, G, d, T, out, threads);                 \
}                                                                                                   \
                                                                                                    \
int ns_newton_backward_##SUF_(const T_ *cov, const T_ *grad, int64_t G, int64_t d, int T, T_ *dcov, \
                              int threads) {                                                        \
    return nt_each_##SUF_(nt_backward_one_##SUF_, cov, grad, G, d, T, dcov, threads);               \
}

#define SQRT_ sqrtf
NS_NEWTON(float, f32)
#undef SQRT_
#define SQRT_ sqrt
NS_NEWTON(double, f64)
#undef SQRT_
#undef NS_NEWTON
