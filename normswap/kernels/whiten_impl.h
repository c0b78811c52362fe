/* The kernels of whiten.h for one element type: included with
 *   WH_T  the element type          WH_SUF  the name suffix
 * defined. Layout and formulas: whiten.h.
 */
#define WH_CAT_(a, b) a##_##b
#define WH_CAT(a, b) WH_CAT_(a, b)
#define WF(name) WH_CAT(name, WH_SUF)
#define WV WF(wh_vec)
#define WVL ((int64_t)(64 / sizeof(WH_T)))          /* positions per vector */
#define WCH ((int64_t)(WH_ROW_BYTES / sizeof(WH_T))) /* positions per chunk */
#define WTILE 4                                      /* vectors per tile side */

typedef WH_T WV __attribute__((vector_size(64)));

/* a thread's buffers: chunk rows of two inputs and of the output, the tiles' sums in WH_T
 * and their lanes in double */
typedef struct {
    WH_T *a, *b, *o;
    WV *acc;
    double *accd;
    void *block;
} WF(wh_work);

static int WF(wh_work_alloc)(WF(wh_work) *w) {
    size_t rows = (size_t)(WH_D * WCH) * sizeof(WH_T);
    size_t nacc = WH_D * WH_D;
    w->block = malloc(3 * rows + nacc * sizeof(WV) + nacc * (size_t)WVL * sizeof(double) + 64);
    if (!w->block) return 0;
    char *p = (char *)(((uintptr_t)w->block + 63) & ~(uintptr_t)63);
    w->a = (WH_T *)p;
    w->b = (WH_T *)(p + rows);
    w->o = (WH_T *)(p + 2 * rows);
    w->acc = (WV *)(p + 3 * rows);
    w->accd = (double *)(p + 3 * rows + nacc * sizeof(WV));
    return 1;
}

/* positions of a chunk, rounded up to whole tiles of vectors */
static int64_t WF(wh_padded)(int64_t cnt) {
    const int64_t t = WVL * WTILE;
    return (cnt + t - 1) / t * t;
}

/* Columns [p0, p0 + cnt) of the rows c0 .. c0 + 15 of x into buf (row j at buf + j WCH),
 * minus mu[c0 + j] (mu NULL: 0), zeros up to the padded length; rowsum (not NULL, with mu
 * NULL): += the rows' sums over the chunk, added in vector lanes (a segment of a row is as
 * short as L: one lane reduction per segment cost more than the copy for small maps). */
static void WF(wh_gather)(const WH_T *x, int64_t C, int64_t L, int64_t c0, int64_t p0, int64_t cnt,
                          const WH_T *mu, WH_T *buf, double *rowsum) {
    const int64_t pad = WF(wh_padded)(cnt);
    for (int j = 0; j < WH_D; j++) {
        WH_T *b = buf + j * WCH;
        const WH_T m = mu ? mu[c0 + j] : (WH_T)0;
        int64_t n = p0 / L, l = p0 - n * L, o = 0;
        while (o < cnt) {
            const int64_t seg = L - l < cnt - o ? L - l : cnt - o;
            const WH_T *src = x + (n * C + c0 + j) * L + l;
            WH_T *dst = b + o;
            for (int64_t k = 0; k < seg; k++) dst[k] = src[k] - m;
            /* the row's next chunk: its lines requested now (the hardware prefetcher does not
             * follow 16 or 32 rows read a chunk at a time) */
            if (l + seg + WCH <= L)
                for (int64_t q = 0; q < WCH; q += 64 / (int64_t)sizeof(WH_T))
                    __builtin_prefetch(src + seg + q, 0, 3);
            o += seg;
            n++;
            l = 0;
        }
        for (; o < pad; o++) b[o] = 0;
        if (rowsum) {
            WV v = *(const WV *)b;
            for (int64_t k = WVL; k < pad; k += WVL) v += *(const WV *)(b + k);
            WH_T s = 0;
            for (int64_t k = 0; k < WVL; k++) s += v[k];
            rowsum[j] += (double)s;
        }
    }
}

/* the inverse: buf's columns [0, cnt) into columns [p0, p0 + cnt) of rows c0 .. of x */
static void WF(wh_scatter)(const WH_T *buf, int64_t C, int64_t L, int64_t c0, int64_t p0, int64_t cnt,
                           WH_T *x) {
    for (int j = 0; j < WH_D; j++) {
        const WH_T *b = buf + j * WCH;
        int64_t n = p0 / L, l = p0 - n * L, o = 0;
        while (o < cnt) {
            const int64_t seg = L - l < cnt - o ? L - l : cnt - o;
            WH_T *dst = x + (n * C + c0 + j) * L + l;
            const WH_T *src = b + o;
#pragma omp simd
            for (int64_t k = 0; k < seg; k++) dst[k] = src[k];
            o += seg;
            n++;
            l = 0;
        }
    }
}

/* acc[16 i + j] += a_i * b_j lane by lane over nb vectors of the chunk rows (nb a multiple
 * of WTILE); sym (a == b): the tiles with j >= i only */
static void WF(wh_cross_acc)(const WH_T *restrict a, const WH_T *restrict b, int64_t nb,
                              WV *restrict acc, int sym) {
    for (int ti = 0; ti < WH_D; ti += WTILE)
        for (int tj = sym ? ti : 0; tj < WH_D; tj += WTILE) {
            WV c[WTILE][WTILE];
            for (int r = 0; r < WTILE; r++)
                for (int s = 0; s < WTILE; s++) c[r][s] = acc[(ti + r) * WH_D + tj + s];
#pragma GCC unroll 1
            for (int64_t k = 0; k < nb; k++) {
                WV u[WTILE], v[WTILE];
                for (int r = 0; r < WTILE; r++) {
                    u[r] = *(const WV *)(a + (ti + r) * WCH + k * WVL);
                    v[r] = *(const WV *)(b + (tj + r) * WCH + k * WVL);
                }
                for (int r = 0; r < WTILE; r++)
                    for (int s = 0; s < WTILE; s++) c[r][s] += u[r] * v[s];
            }
            for (int r = 0; r < WTILE; r++)
                for (int s = 0; s < WTILE; s++) acc[(ti + r) * WH_D + tj + s] = c[r][s];
        }
}

/* the sums in WH_T into the double lanes, and zero */
static void WF(wh_flush)(WV *acc, double *accd) {
    for (int p = 0; p < WH_D * WH_D; p++)
        for (int64_t k = 0; k < WVL; k++) accd[p * WVL + k] += (double)acc[p][k];
    memset(acc, 0, sizeof(WV) * WH_D * WH_D);
}

/* mu[c0 + j] = mean of row j over the group's N L columns (chunks of a plane summed in
 * WH_T, the chunks' sums in double), rounded to WH_T */
static void WF(wh_means)(const WH_T *x, int64_t N, int64_t C, int64_t L, int64_t c0, WH_T *mu) {
    for (int j = 0; j < WH_D; j++) {
        double s = 0;
        for (int64_t n = 0; n < N; n++) {
            const WH_T *row = x + (n * C + c0 + j) * L;
            for (int64_t l0 = 0; l0 < L; l0 += WCH) {
                const int64_t cnt = L - l0 < WCH ? L - l0 : WCH;
                WH_T t = 0;
#pragma omp simd reduction(+:t)
                for (int64_t k = 0; k < cnt; k++) t += row[l0 + k];
                s += (double)t;
            }
        }
        mu[c0 + j] = (WH_T)(s / (double)(N * L));
    }
}

/* out[16 i + j] = sum over the group's columns of (a_i - mu_a_i)(b_j - mu_b_j); asum[j] (not
 * NULL): the rows' sums of the raw a. a == b with mu_a == mu_b: one gather, half the tiles. */
static void WF(wh_cross_group)(const WH_T *a, const WH_T *mu_a, const WH_T *b, const WH_T *mu_b,
                               int64_t N, int64_t C, int64_t L, int64_t c0, WF(wh_work) *w,
                               double *out, double *asum) {
    const int sym = a == b && mu_a == mu_b;
    const int64_t m = N * L;
    double rs[WH_D] = {0};
    memset(w->acc, 0, sizeof(WV) * WH_D * WH_D);
    memset(w->accd, 0, sizeof(double) * WH_D * WH_D * (size_t)WVL);
    int chunks = 0;
    for (int64_t p0 = 0; p0 < m; p0 += WCH) {
        const int64_t cnt = m - p0 < WCH ? m - p0 : WCH;
        WF(wh_gather)(a, C, L, c0, p0, cnt, mu_a, w->a, asum ? rs : NULL);
        if (!sym) WF(wh_gather)(b, C, L, c0, p0, cnt, mu_b, w->b, NULL);
        WF(wh_cross_acc)(w->a, sym ? w->a : w->b, WF(wh_padded)(cnt) / WVL, w->acc, sym);
        if (++chunks == WH_FLUSH) {
            WF(wh_flush)(w->acc, w->accd);
            chunks = 0;
        }
    }
    WF(wh_flush)(w->acc, w->accd);
    for (int i = 0; i < WH_D; i++)
        for (int j = 0; j < WH_D; j++) {
            if (sym && j < i) {
                out[i * WH_D + j] = out[j * WH_D + i];
                continue;
            }
            const double *lanes = w->accd + (i * WH_D + j) * WVL;
            double s = 0;
            for (int64_t k = 0; k < WVL; k++) s += lanes[k];
            out[i * WH_D + j] = s;
        }
    if (asum)
        for (int j = 0; j < WH_D; j++) asum[j] = rs[j];
}

/* out = M1 (x1 - mu1) + M2 (x2 - mu2) + bias on the group's columns (M row-major 16 x 16 and
 * bias (16) of this group; x2 NULL: no second term; bias NULL: 0), in tiles of four output
 * rows by four vectors */
static void WF(wh_apply_group)(const WH_T *x1, const WH_T *mu1, const WH_T *M1, const WH_T *x2,
                               const WH_T *mu2, const WH_T *M2, const WH_T *bias, int64_t N,
                               int64_t C, int64_t L, int64_t c0, WF(wh_work) *w, WH_T *out) {
    const int64_t m = N * L;
    for (int64_t p0 = 0; p0 < m; p0 += WCH) {
        const int64_t cnt = m - p0 < WCH ? m - p0 : WCH, nb = WF(wh_padded)(cnt) / WVL;
        WF(wh_gather)(x1, C, L, c0, p0, cnt, mu1, w->a, NULL);
        if (x2) WF(wh_gather)(x2, C, L, c0, p0, cnt, mu2, w->b, NULL);
        for (int64_t k = 0; k < nb; k += WTILE)
            for (int i = 0; i < WH_D; i += WTILE) {
                WV c[WTILE][WTILE];
                for (int r = 0; r < WTILE; r++) {
                    const WV zero = {0};
                    const WH_T b0 = bias ? bias[i + r] : (WH_T)0;
                    for (int q = 0; q < WTILE; q++) c[r][q] = zero + b0;
                }
                for (int j = 0; j < WH_D; j++) {
                    WV u[WTILE];
                    for (int q = 0; q < WTILE; q++) u[q] = *(const WV *)(w->a + j * WCH + (k + q) * WVL);
                    for (int r = 0; r < WTILE; r++) {
                        const WH_T s = M1[(i + r) * WH_D + j];
                        for (int q = 0; q < WTILE; q++) c[r][q] += s * u[q];
                    }
                }
                if (x2)
                    for (int j = 0; j < WH_D; j++) {
                        WV u[WTILE];
                        for (int q = 0; q < WTILE; q++) u[q] = *(const WV *)(w->b + j * WCH + (k + q) * WVL);
                        for (int r = 0; r < WTILE; r++) {
                            const WH_T s = M2[(i + r) * WH_D + j];
                            for (int q = 0; q < WTILE; q++) c[r][q] += s * u[q];
                        }
                    }
                for (int r = 0; r < WTILE; r++)
                    for (int q = 0; q < WTILE; q++) *(WV *)(w->o + (i + r) * WCH + (k + q) * WVL) = c[r][q];
            }
        WF(wh_scatter)(w->o, C, L, c0, p0, cnt, out);
    }
}

/* what one call does to every group (see the two entry points): the forward's outputs mu,
 * cov, W, Wg are the backward's inputs */
typedef struct {
    int backward;
    int64_t N, C, L;
    int T;
    double eps;
    const WH_T *x, *dy, *gamma, *beta;
    WH_T *mu, *cov, *W, *Wg, *out, *dgamma, *dbeta;
} WF(wh_call);

/* group g's training forward: mu, Sigma = cov(x) + eps I, W = newton(Sigma), W' = diag(gamma) W,
 * y = W' (x - mu) + beta (nt: the Newton iteration's scratch) */
static void WF(wh_forward_group)(const WF(wh_call) *q, int64_t g, WF(wh_work) *w, WH_T *nt) {
    const int64_t c0 = g * WH_D, dd = WH_D * WH_D, m = q->N * q->L;
    WH_T *cov = q->cov + g * dd, *W = q->W + g * dd, *Wg = q->Wg + g * dd;
    double sums[WH_D * WH_D];
    WF(wh_means)(q->x, q->N, q->C, q->L, c0, q->mu);
    WF(wh_cross_group)(q->x, q->mu, q->x, q->mu, q->N, q->C, q->L, c0, w, sums, NULL);
    for (int64_t i = 0; i < dd; i++)
        cov[i] = (WH_T)(sums[i] / (double)m) + (i % (WH_D + 1) == 0 ? (WH_T)q->eps : (WH_T)0);
    WF(nt_forward_one)(cov, NULL, WH_D, q->T, W, nt);
    for (int i = 0; i < WH_D; i++)
        for (int j = 0; j < WH_D; j++)
            Wg[i * WH_D + j] = q->gamma ? W[i * WH_D + j] * q->gamma[c0 + i] : W[i * WH_D + j];
    WF(wh_apply_group)(q->x, q->mu, Wg, NULL, NULL, NULL, q->beta ? q->beta + c0 : NULL, q->N, q->C,
                       q->L, c0, w, q->out);
}

/* group g's backward: dW' = dy (x - mu)^T, dbeta = rowsum(dy), dgamma = rowsum(dW' * W),
 * dSigma = newton_backward(Sigma, diag(gamma) dW'), S = (dSigma + dSigma^T) / m,
 * dx = W'^T dy + S (x - mu) - W'^T mean(dy) */
static void WF(wh_backward_group)(const WF(wh_call) *q, int64_t g, WF(wh_work) *w, WH_T *nt) {
    const int64_t c0 = g * WH_D, dd = WH_D * WH_D, m = q->N * q->L;
    const WH_T *cov = q->cov + g * dd, *W = q->W + g * dd, *Wg = q->Wg + g * dd;
    double sums[WH_D * WH_D], dysum[WH_D];
    WH_T dW[WH_D * WH_D], dcov[WH_D * WH_D], S[WH_D * WH_D], Wt[WH_D * WH_D], shift[WH_D], dymean[WH_D];
    WF(wh_cross_group)(q->dy, NULL, q->x, q->mu, q->N, q->C, q->L, c0, w, sums, dysum);
    for (int i = 0; i < WH_D; i++) {
        WH_T gsum = 0;
        for (int j = 0; j < WH_D; j++) {
            const WH_T dwg = (WH_T)sums[i * WH_D + j];
            gsum += dwg * W[i * WH_D + j];
            dW[i * WH_D + j] = q->gamma ? dwg * q->gamma[c0 + i] : dwg;
        }
        if (q->dgamma) q->dgamma[c0 + i] = gsum;
        if (q->dbeta) q->dbeta[c0 + i] = (WH_T)dysum[i];
        dymean[i] = (WH_T)(dysum[i] / (double)m);
    }
    WF(nt_backward_one)(cov, dW, WH_D, q->T, dcov, nt);
    for (int i = 0; i < WH_D; i++) {
        WH_T sh = 0;
        for (int j = 0; j < WH_D; j++) {
            S[i * WH_D + j] = (dcov[i * WH_D + j] + dcov[j * WH_D + i]) / (WH_T)m;
            Wt[i * WH_D + j] = Wg[j * WH_D + i];
            sh += Wg[j * WH_D + i] * dymean[j];
        }
        shift[i] = -sh;
    }
    WF(wh_apply_group)(q->dy, NULL, Wt, q->x, q->mu, S, shift, q->N, q->C, q->L, c0, w, q->out);
}

static int WF(wh_run)(const WF(wh_call) *q, int threads) {
    const int64_t G = q->C / WH_D;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        WF(wh_work) w;
        WH_T *nt = (WH_T *)malloc(sizeof(WH_T) * (size_t)nt_scratch(WH_D, q->T));
        const int ok = WF(wh_work_alloc)(&w) && nt;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < G; g++) {
            if (!ok) continue;
            if (q->backward)
                WF(wh_backward_group)(q, g, &w, nt);
            else
                WF(wh_forward_group)(q, g, &w, nt);
        }
        free(w.block);
        free(nt);
    }
    return failed ? -1 : 0;
}

/* IterNorm's training forward of x (N, C, L), C a multiple of 16: mu (C), cov = Sigma, W, Wg
 * (C / 16, 16, 16), y (N, C, L); gamma / beta (C) may be NULL. -1 where a buffer cannot be
 * allocated. */
int WF(ns_whiten_forward)(const WH_T *x, int64_t N, int64_t C, int64_t L, int T, double eps,
                          const WH_T *gamma, const WH_T *beta, WH_T *mu, WH_T *cov, WH_T *W, WH_T *Wg,
                          WH_T *y, int threads) {
    WF(wh_call) q = {0, N, C, L, T, eps, x, NULL, gamma, beta, mu, cov, W, Wg, y, NULL, NULL};
    return WF(wh_run)(&q, threads);
}

/* its backward for dy: dx (N, C, L), dgamma / dbeta (C; NULL: not computed) */
int WF(ns_whiten_backward)(const WH_T *x, const WH_T *dy, int64_t N, int64_t C, int64_t L, int T,
                           const WH_T *gamma, const WH_T *mu, const WH_T *cov, const WH_T *W,
                           const WH_T *Wg, WH_T *dx, WH_T *dgamma, WH_T *dbeta, int threads) {
    WF(wh_call) q = {1, N, C, L, T, 0.0, x, dy, gamma, NULL, (WH_T *)mu, (WH_T *)cov, (WH_T *)W,
                     (WH_T *)Wg, dx, dgamma, dbeta};
    return WF(wh_run)(&q, threads);
}

#undef WTILE
#undef WCH
#undef WVL
#undef WV
#undef WF
#undef WH_CAT
#undef WH_CAT_
