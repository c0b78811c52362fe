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
 * Everything is computed in double precision whatever the input type (d is small: a
 * product is d^3 multiply-adds); one matrix per OpenMP iteration, on `threads` threads.
 * In PyTorch these are about 15 (forward) and 45 (backward) calls per layer and step,
 * whose dispatch costs more than their arithmetic: resnet18's 20 IterNorm layers (one
 * thread) spend 12.2 ms a step in them, 6.0 ms here.
 */

/* C = A B for d x d row-major matrices (the inner loop runs along C's and B's rows: vectors).
 * d = 16 (IterNorm's default group) has a fixed-size version: four rows of C at a time in
 * registers (with AVX-512, two 8-double vectors per row and fused multiply-adds), so that
 * four chains of multiply-adds overlap. */
#if defined(__AVX512F__)
static void nt_mm16(const double *restrict A, const double *restrict B, double *restrict C) {
    for (int i = 0; i < 16; i += 4) {
        __m512d c0l = _mm512_setzero_pd(), c0h = c0l, c1l = c0l, c1h = c0l,
                c2l = c0l, c2h = c0l, c3l = c0l, c3h = c0l;
        for (int k = 0; k < 16; k++) {
            const __m512d bl = _mm512_loadu_pd(B + k * 16), bh = _mm512_loadu_pd(B + k * 16 + 8);
            __m512d a = _mm512_set1_pd(A[i * 16 + k]);
            c0l = _mm512_fmadd_pd(a, bl, c0l); c0h = _mm512_fmadd_pd(a, bh, c0h);
            a = _mm512_set1_pd(A[(i + 1) * 16 + k]);
            c1l = _mm512_fmadd_pd(a, bl, c1l); c1h = _mm512_fmadd_pd(a, bh, c1h);
            a = _mm512_set1_pd(A[(i + 2) * 16 + k]);
            c2l = _mm512_fmadd_pd(a, bl, c2l); c2h = _mm512_fmadd_pd(a, bh, c2h);
            a = _mm512_set1_pd(A[(i + 3) * 16 + k]);
            c3l = _mm512_fmadd_pd(a, bl, c3l); c3h = _mm512_fmadd_pd(a, bh, c3h);
        }
        double *c = C + i * 16;
        _mm512_storeu_pd(c, c0l); _mm512_storeu_pd(c + 8, c0h);
        _mm512_storeu_pd(c + 16, c1l); _mm512_storeu_pd(c + 24, c1h);
        _mm512_storeu_pd(c + 32, c2l); _mm512_storeu_pd(c + 40, c2h);
        _mm512_storeu_pd(c + 48, c3l); _mm512_storeu_pd(c + 56, c3h);
    }
}
#else
static void nt_mm16(const double *restrict A, const double *restrict B, double *restrict C) {
    for (int i = 0; i < 16; i += 4) {
        double c[4][16] = {{0.0}};
        for (int k = 0; k < 16; k++) {
            const double *restrict b = B + k * 16;
            for (int r = 0; r < 4; r++) {
                const double a = A[(i + r) * 16 + k];
                for (int j = 0; j < 16; j++) c[r][j] += a * b[j];
            }
        }
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < 16; j++) C[(i + r) * 16 + j] = c[r][j];
    }
}
#endif

static void nt_mm(const double *restrict A, const double *restrict B, double *restrict C, int64_t d) {
    if (d == 16) {
        nt_mm16(A, B, C);
        return;
    }
    for (int64_t i = 0; i < d; i++) {
        double *restrict c = C + i * d;
        for (int64_t j = 0; j < d; j++) c[j] = 0.0;
        for (int64_t k = 0; k < d; k++) {
            const double a = A[i * d + k];
            const double *restrict b = B + k * d;
            for (int64_t j = 0; j < d; j++) c[j] += a * b[j];
        }
    }
}

/* C = op(A) op(B), op(M) = M or M^T; tmp: d x d scratch for a transposed operand */
static void nt_matmul(const double *A, int ta, const double *B, int tb, double *C, int64_t d, double *tmp) {
    if (ta || tb) {
        const double *M = ta ? A : B;
        for (int64_t i = 0; i < d; i++)
            for (int64_t j = 0; j < d; j++) tmp[j * d + i] = M[i * d + j];
        if (ta) A = tmp; else B = tmp;
    }
    nt_mm(A, B, C, d);
}

/* tr(Sigma), S = Sigma / tr and the steps: P_k into steps[3 (k - 1)] for k = 1..T-1 with
 * P_k^2, P_k^3 after it, P_T into p. Returns tr. */
static double nt_steps(const double *cov, int64_t d, int T, double *S, double *steps, double *p) {
    int64_t dd = d * d;
    double tr = 0.0;
    for (int64_t i = 0; i < d; i++) tr += cov[i * d + i];
    for (int64_t i = 0; i < dd; i++) S[i] = cov[i] / tr;
    for (int64_t i = 0; i < dd; i++) p[i] = T >= 1 ? -0.5 * S[i] : 0.0;
    for (int64_t i = 0; i < d; i++) p[i * d + i] += T >= 1 ? 1.5 : 1.0;
    for (int s = 0; s + 1 < T; s++) {
        double *P = steps + 3 * s * dd, *PP = P + dd, *PPP = PP + dd;
        for (int64_t i = 0; i < dd; i++) P[i] = p[i];
        nt_mm(P, P, PP, d);
        nt_mm(PP, P, PPP, d);
        nt_mm(PPP, S, p, d);
        for (int64_t i = 0; i < dd; i++) p[i] = 1.5 * P[i] - 0.5 * p[i];
    }
    return tr;
}

/* scratch doubles per thread, in d x d matrices: the forward uses c, S, p and the steps
 * (3 (T - 1)); the backward six more (gp, gs, h, t1, t2, tt) */
static int64_t nt_scratch(int64_t d, int T) { return (int64_t)(3 * (T > 1 ? T - 1 : 0) + 8) * d * d; }

#define NS_NEWTON(T_, SUF_)                                                                         \
int ns_newton_forward_##SUF_(const T_ *cov, int64_t G, int64_t d, int T, T_ *out, int threads) {    \
    int64_t dd = d * d;                                                                             \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(threads)")                                                    \
    {                                                                                               \
        double *w = (double *)malloc(sizeof(double) * (size_t)(nt_scratch(d, T) + dd));             \
        if (!w) {                                                                                   \
            _Pragma("omp atomic write")                                                             \
            failed = 1;                                                                             \
        }                                                                                           \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t g = 0; g < G; g++) {                                                           \
            if (!w) continue;                                                                       \
            double *c = w, *S = c + dd, *p = S + dd, *steps = p + dd;                               \
            for (int64_t i = 0; i < dd; i++) c[i] = (double)cov[g * dd + i];                        \
            double rs = 1.0 / sqrt(nt_steps(c, d, T, S, steps, p));                                 \
            for (int64_t i = 0; i < dd; i++) out[g * dd + i] = (T_)(p[i] * rs);                     \
        }                                                                                           \
        free(w);                                                                                    \
    }                                                                                               \
    return failed ? -1 : 0;                                                                         \
}                                                                                                   \
                                                                                                    \
int ns_newton_backward_##SUF_(const T_ *cov, const T_ *grad, int64_t G, int64_t d, int T, T_ *dcov, \
                              int threads) {                                                        \
    int64_t dd = d * d;                                                                             \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(threads)")                                                    \
    {                                                                                               \
        double *w = (double *)malloc(sizeof(double) * (size_t)(nt_scratch(d, T) + 2 * dd));         \
        if (!w) {                                                                                   \
            _Pragma("omp atomic write")                                                             \
            failed = 1;                                                                             \
        }                                                                                           \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t g = 0; g < G; g++) {                                                           \
            if (!w) continue;                                                                       \
            double *c = w, *S = c + dd, *p = S + dd, *gp = p + dd, *gs = gp + dd, *h = gs + dd,     \
                   *t1 = h + dd, *t2 = t1 + dd, *tt = t2 + dd, *steps = tt + dd;                    \
            for (int64_t i = 0; i < dd; i++) c[i] = (double)cov[g * dd + i];                        \
            double tr = nt_steps(c, d, T, S, steps, p), rs = 1.0 / sqrt(tr);                        \
            double gtr = 0.0;                                                                       \
            for (int64_t i = 0; i < dd; i++) {                                                      \
                double gi = (double)grad[g * dd + i];                                               \
                gp[i] = gi * rs;                                                                    \
                gtr += gi * p[i];                                                                   \
                gs[i] = 0.0;                                                                        \
            }                                                                                       \
            gtr = -0.5 * gtr * rs / tr;                                                             \
            for (int s = T - 2; s >= 0; s--) {                                                      \
                const double *P = steps + 3 * s * dd, *PP = P + dd, *PPP = PP + dd;                 \
                nt_matmul(PPP, 1, gp, 0, t1, d, tt);                                                \
                for (int64_t i = 0; i < dd; i++) gs[i] -= 0.5 * t1[i];                              \
                nt_matmul(gp, 0, S, 1, h, d, tt);                                                   \
                for (int64_t i = 0; i < dd; i++) h[i] *= -0.5;                                      \
                for (int64_t i = 0; i < dd; i++) gp[i] *= 1.5;                                      \
                nt_matmul(h, 0, PP, 1, t1, d, tt);                                                  \
                for (int64_t i = 0; i < dd; i++) gp[i] += t1[i];                                    \
                nt_matmul(P, 1, h, 0, t2, d, tt);                                                   \
                nt_matmul(t2, 0, P, 1, t1, d, tt);                                                  \
                for (int64_t i = 0; i < dd; i++) gp[i] += t1[i];                                    \
                nt_matmul(PP, 1, h, 0, t1, d, tt);                                                  \
                for (int64_t i = 0; i < dd; i++) gp[i] += t1[i];                                    \
            }                                                                                       \
            if (T >= 1)                                                                             \
                for (int64_t i = 0; i < dd; i++) gs[i] -= 0.5 * gp[i];                              \
            double sgc = 0.0;                                                                       \
            for (int64_t i = 0; i < dd; i++) sgc += gs[i] * c[i];                                   \
            gtr -= sgc / (tr * tr);                                                                 \
            for (int64_t i = 0; i < dd; i++)                                                        \
                dcov[g * dd + i] = (T_)(gs[i] / tr + (i % (d + 1) == 0 ? gtr : 0.0));               \
        }                                                                                           \
        free(w);                                                                                    \
    }                                                                                               \
    return failed ? -1 : 0;                                                                         \
}

NS_NEWTON(float, f32)
NS_NEWTON(double, f64)
#undef NS_NEWTON
