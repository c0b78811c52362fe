/* The kernels of whiten.h for one element type: included with
 *   WH_T  the element type          WH_SUF  the name suffix
 * defined. Layout and formulas: whiten.h.
 */
#define WH_CAT_(a, b) a##_##b
#define WH_CAT(a, b) WH_CAT_(a, b)
#define WF(name) WH_CAT(name, WH_SUF)
#define WV WF(wh_vec)
#define WVL ((int64_t)(WH_VEC_BYTES / sizeof(WH_T))) /* positions per vector */
#define WCH ((int64_t)(WH_ROW_BYTES / sizeof(WH_T)))  /* positions per chunk */

typedef WH_T WV __attribute__((vector_size(WH_VEC_BYTES)));

/* The cache lines of the next chunk, requested a few at a time while this chunk's products
 * run: line[next .. n) not requested yet, those from first_write on the output's (requested
 * for writing), per of them requested before each tile of the products. A chunk reads 16
 * rows of each input 1 KiB at a time, which the hardware prefetcher does not follow; the
 * next chunk's lines requested all at once, in the gather, waited for each other, and the
 * products then ran with no reads in flight. */
typedef struct {
    const char *line[WH_AHEAD_LINES];
    int n, next, per, first_write;
} WF(wh_ahead);

/* a thread's buffers: chunk rows of two inputs and of the output, the tiles' sums in WH_T
 * and their lanes in double */
typedef struct {
    WH_T *a, *b, *o;
    WV *acc;
    double *accd;
    WF(wh_ahead) *ahead;
    void *block;
} WF(wh_work);

static int WF(wh_work_alloc)(WF(wh_work) *w) {
    size_t rows = (size_t)(WH_D * WCH) * sizeof(WH_T);
    size_t nacc = WH_D * WH_D;
    w->block = malloc(3 * rows + nacc * sizeof(WV) + nacc * (size_t)WVL * sizeof(double) +
                      sizeof(WF(wh_ahead)) + 64);
    if (!w->block) return 0;
    char *p = (char *)(((uintptr_t)w->block + 63) & ~(uintptr_t)63);
    w->a = (WH_T *)p;
    w->b = (WH_T *)(p + rows);
    w->o = (WH_T *)(p + 2 * rows);
    w->acc = (WV *)(p + 3 * rows);
    w->accd = (double *)(p + 3 * rows + nacc * sizeof(WV));
    w->ahead = (WF(wh_ahead) *)(p + 3 * rows + nacc * sizeof(WV) + nacc * (size_t)WVL * sizeof(double));
    return 1;
}

/* positions of a chunk, rounded up to whole tiles of output vectors */
static int64_t WF(wh_padded)(int64_t cnt) {
    const int64_t t = WVL * WH_OUT_VECS;
    return (cnt + t - 1) / t * t;
}

/* Planes shorter than a vector, whole ones: the chunk's samples n0 .. n0 + ns - 1 one at a
 * time, whose 16 planes of the group lie together in x (16 L values), row j's into buf + j WCH
 * (to_buf), or back (else). L is a constant in each copy (wh_planes): a plane is a few
 * straight moves. Row by row, each plane was a segment of the general walk, a loop of L
 * single values, and the rows went 16 times over the same lines of x. */
static inline __attribute__((always_inline)) void WF(wh_planes_)(WH_T *x, int64_t C, const int64_t L, int64_t c0,
                                                                   int64_t n0, int64_t ns, const WH_T *mu, WH_T *buf,
                                                                   const int to_buf) {
    WH_T m[WH_D];
    for (int j = 0; j < WH_D; j++) m[j] = mu ? mu[c0 + j] : (WH_T)0;
    for (int64_t s = 0; s < ns; s++) {
        WH_T *xs = x + ((n0 + s) * C + c0) * L, *bs = buf + s * L;
        for (int j = 0; j < WH_D; j++)
            for (int64_t k = 0; k < L; k++) {
                if (to_buf) bs[j * WCH + k] = xs[j * L + k] - m[j];
                else xs[j * L + k] = bs[j * WCH + k];
            }
    }
}

/* wh_planes_ where it applies (planes shorter than a vector, the chunk whole planes): 1 if done */
static int WF(wh_planes)(const WH_T *x, int64_t C, int64_t L, int64_t c0, int64_t p0, int64_t cnt,
                         const WH_T *mu, WH_T *buf, int to_buf) {
    if (L >= WVL || p0 % L || cnt % L) return 0;
    WH_T *xw = (WH_T *)(uintptr_t)x;   /* (written only by the scatter, whose x is its output) */
    const int64_t n0 = p0 / L, ns = cnt / L;
#define WH_PLANES_OF(Lc) (to_buf ? WF(wh_planes_)(xw, C, Lc, c0, n0, ns, mu, buf, 1) \
                                : WF(wh_planes_)(xw, C, Lc, c0, n0, ns, mu, buf, 0))
    switch (L) {
        case 1: WH_PLANES_OF(1); break;
        case 2: WH_PLANES_OF(2); break;
        case 4: WH_PLANES_OF(4); break;
        default: WH_PLANES_OF(L);
    }
#undef WH_PLANES_OF
    return 1;
}

/* Columns [p0, p0 + cnt) of the rows c0 .. c0 + 15 of x into buf (row j at buf + j WCH),
 * minus mu[c0 + j] (mu NULL: 0), zeros up to the padded length; rowsum (not NULL, with mu
 * NULL): += the rows' sums over the chunk, added in vector lanes (a segment of a row is as
 * short as L: one lane reduction per segment cost more than the copy for small maps).
 * noinline: gcc decides by the size of the whole file; when a change elsewhere in rows.c
 * (DN's requests) tipped it into inlining this into wh_cross_group and wh_apply_group, the
 * kernel took 1.29x its time on (32, 256, 14, 14) (profiled; IterNorm2d 1.65x
 * nn.BatchNorm2d against 1.33-1.44x). */
__attribute__((noinline))
static void WF(wh_gather)(const WH_T *x, int64_t C, int64_t L, int64_t c0, int64_t p0, int64_t cnt,
                          const WH_T *mu, WH_T *buf, double *rowsum) {
    const int64_t pad = WF(wh_padded)(cnt);
    const int planes = WF(wh_planes)(x, C, L, c0, p0, cnt, mu, buf, 1);
    for (int j = 0; j < WH_D; j++) {
        WH_T *b = buf + j * WCH;
        const WH_T m = mu ? mu[c0 + j] : (WH_T)0;
        int64_t n = p0 / L, l = p0 - n * L, o = planes ? cnt : 0;
        while (o < cnt) {
            const int64_t seg = L - l < cnt - o ? L - l : cnt - o;
            const WH_T *src = x + (n * C + c0 + j) * L + l;
            WH_T *dst = b + o;
            int64_t k = 0;
            for (; k + WVL <= seg; k += WVL) {   /* whole vectors (a segment may be as short as L) */
                WV v;
                memcpy(&v, src + k, sizeof v);
                v -= m;
                memcpy(dst + k, &v, sizeof v);
            }
            for (; k < seg; k++) dst[k] = src[k] - m;
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

/* q += the lines of columns [p0, p0 + cnt) of the rows c0 .. c0 + 15 of x (as many as fit) */
static void WF(wh_ahead_add)(WF(wh_ahead) *q, const WH_T *x, int64_t C, int64_t L, int64_t c0, int64_t p0,
                             int64_t cnt) {
    for (int j = 0; j < WH_D; j++) {
        int64_t n = p0 / L, l = p0 - n * L, o = 0;
        while (o < cnt) {
            const int64_t seg = L - l < cnt - o ? L - l : cnt - o;
            const WH_T *row = x + (n * C + c0 + j) * L;
            const char *a = (const char *)((uintptr_t)(row + l) & ~(uintptr_t)63);
            for (; a < (const char *)(row + l + seg) && q->n < WH_AHEAD_LINES; a += 64) q->line[q->n++] = a;
            o += seg;
            n++;
            l = 0;
        }
    }
}

/* q: the next chunk's lines of x1 (and x2) to read, and of out (not NULL) to write, where the
 * pass reads more than stays in cache (below that the requests only cost time), requested
 * over `tiles` tiles of products */
static void WF(wh_ahead_plan)(WF(wh_ahead) *q, const WH_T *x1, const WH_T *x2, WH_T *out, int64_t C,
                              int64_t L, int64_t c0, int64_t p0, int64_t m, int tiles) {
    q->n = q->next = q->per = 0;
    q->first_write = WH_AHEAD_LINES;
    const int64_t next = p0 + WCH, inputs = x2 ? 2 : 1;
    if (next >= m || (inputs + (out != NULL)) * m * WH_D * (int64_t)sizeof(WH_T) <= WH_AHEAD_MIN_BYTES) return;
    const int64_t cnt = m - next < WCH ? m - next : WCH;
    WF(wh_ahead_add)(q, x1, C, L, c0, next, cnt);
    if (x2) WF(wh_ahead_add)(q, x2, C, L, c0, next, cnt);
    if (out) {
        q->first_write = q->n;
        WF(wh_ahead_add)(q, out, C, L, c0, next, cnt);
    }
    q->per = (q->n + tiles - 1) / tiles;
}

/* request up to `count` more of q's lines */
static inline void WF(wh_ahead_request)(WF(wh_ahead) *q, int count) {
    for (; count > 0 && q->next < q->n; count--, q->next++) {
        if (q->next >= q->first_write)
            __builtin_prefetch(q->line[q->next], 1, 3);
        else
            __builtin_prefetch(q->line[q->next], 0, 3);
    }
}

/* the inverse: buf's columns [0, cnt) into columns [p0, p0 + cnt) of rows c0 .. of x */
static void WF(wh_scatter)(const WH_T *buf, int64_t C, int64_t L, int64_t c0, int64_t p0, int64_t cnt,
                           WH_T *x) {
    if (WF(wh_planes)(x, C, L, c0, p0, cnt, NULL, (WH_T *)(uintptr_t)buf, 0)) return;
    for (int j = 0; j < WH_D; j++) {
        const WH_T *b = buf + j * WCH;
        int64_t n = p0 / L, l = p0 - n * L, o = 0;
        while (o < cnt) {
            const int64_t seg = L - l < cnt - o ? L - l : cnt - o;
            WH_T *dst = x + (n * C + c0 + j) * L + l;
            const WH_T *src = b + o;
            int64_t k = 0;
            for (; k + WVL <= seg; k += WVL) memcpy(dst + k, src + k, sizeof(WV));
            for (; k < seg; k++) dst[k] = src[k];
            o += seg;
            n++;
            l = 0;
        }
    }
}

/* the tiles of wh_cross_acc */
static int WF(wh_cross_tiles)(int sym) {
    int t = 0;
    for (int ti = 0; ti < WH_D; ti += WH_CROSS_ROWS)
        t += (WH_D - (sym ? ti / WH_CROSS_COLS * WH_CROSS_COLS : 0)) / WH_CROSS_COLS;
    return t;
}

/* acc[16 i + j] += a_i * b_j lane by lane over nb vectors of the chunk rows, in tiles of
 * WH_CROSS_ROWS x WH_CROSS_COLS; sym (a == b): the tiles that hold a j >= i only; ahead's
 * lines requested over the tiles */
static void WF(wh_cross_acc)(const WH_T *restrict a, const WH_T *restrict b, int64_t nb,
                              WV *restrict acc, int sym, WF(wh_ahead) *ahead) {
    enum { TR = WH_CROSS_ROWS, TC = WH_CROSS_COLS };
    for (int ti = 0; ti < WH_D; ti += TR)
        for (int tj = sym ? ti / TC * TC : 0; tj < WH_D; tj += TC) {
            WV c[TR][TC];
            WF(wh_ahead_request)(ahead, ahead->per);
            for (int r = 0; r < TR; r++)
                for (int s = 0; s < TC; s++) c[r][s] = acc[(ti + r) * WH_D + tj + s];
#pragma GCC unroll 1
            for (int64_t k = 0; k < nb; k++) {
                WV u[TR], v[TC];
                for (int r = 0; r < TR; r++) {
                    u[r] = *(const WV *)(a + (ti + r) * WCH + k * WVL);
                    NS_IN_REGISTER(u[r]);
                }
                for (int s = 0; s < TC; s++) {
                    v[s] = *(const WV *)(b + (tj + s) * WCH + k * WVL);
                    NS_IN_REGISTER(v[s]);
                }
                for (int r = 0; r < TR; r++)
                    for (int s = 0; s < TC; s++) c[r][s] += u[r] * v[s];
            }
            for (int r = 0; r < TR; r++)
                for (int s = 0; s < TC; s++) acc[(ti + r) * WH_D + tj + s] = c[r][s];
        }
}

/* the sums in WH_T into the double lanes, and zero */
static void WF(wh_flush)(WV *acc, double *accd) {
    for (int p = 0; p < WH_D * WH_D; p++)
        for (int64_t k = 0; k < WVL; k++) accd[p * WVL + k] += (double)acc[p][k];
    memset(acc, 0, sizeof(WV) * WH_D * WH_D);
}

/* mu[c0 + j] = mean of row j over the group's N L columns, rounded to WH_T: planes of at
 * least a chunk summed a chunk at a time (in WH_T, the chunks' sums in double); shorter
 * planes gathered into the buffer and summed there (one lane reduction per chunk and row,
 * not per plane: on 4 x 4 maps those reductions cost more than the copy) */
static void WF(wh_means)(const WH_T *x, int64_t N, int64_t C, int64_t L, int64_t c0, WF(wh_work) *w, WH_T *mu) {
    double s[WH_D] = {0};
    if (L < WCH) {
        for (int64_t p0 = 0; p0 < N * L; p0 += WCH)
            WF(wh_gather)(x, C, L, c0, p0, N * L - p0 < WCH ? N * L - p0 : WCH, NULL, w->a, s);
    } else {
        for (int j = 0; j < WH_D; j++)
            for (int64_t n = 0; n < N; n++) {
                const WH_T *row = x + (n * C + c0 + j) * L;
                for (int64_t l0 = 0; l0 < L; l0 += WCH) {
                    const int64_t cnt = L - l0 < WCH ? L - l0 : WCH;
                    WH_T t = 0;
#pragma omp simd reduction(+:t)
                    for (int64_t k = 0; k < cnt; k++) t += row[l0 + k];
                    s[j] += (double)t;
                }
            }
    }
    for (int j = 0; j < WH_D; j++) mu[c0 + j] = (WH_T)(s[j] / (double)(N * L));
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
        WF(wh_ahead_plan)(w->ahead, a, sym ? NULL : b, NULL, C, L, c0, p0, m, WF(wh_cross_tiles)(sym));
        WF(wh_cross_acc)(w->a, sym ? w->a : w->b, WF(wh_padded)(cnt) / WVL, w->acc, sym, w->ahead);
        WF(wh_ahead_request)(w->ahead, WH_AHEAD_LINES);
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
 * bias (16) of this group; x2 NULL: no second term; bias NULL: 0), in tiles of WH_OUT_ROWS
 * output rows by WH_OUT_VECS vectors */
static void WF(wh_apply_group)(const WH_T *x1, const WH_T *mu1, const WH_T *M1, const WH_T *x2,
                               const WH_T *mu2, const WH_T *M2, const WH_T *bias, int64_t N,
                               int64_t C, int64_t L, int64_t c0, WF(wh_work) *w, WH_T *out) {
    enum { OR = WH_OUT_ROWS, OQ = WH_OUT_VECS };
    const int64_t m = N * L;
    for (int64_t p0 = 0; p0 < m; p0 += WCH) {
        const int64_t cnt = m - p0 < WCH ? m - p0 : WCH, nb = WF(wh_padded)(cnt) / WVL;
        WF(wh_gather)(x1, C, L, c0, p0, cnt, mu1, w->a, NULL);
        if (x2) WF(wh_gather)(x2, C, L, c0, p0, cnt, mu2, w->b, NULL);
        WF(wh_ahead_plan)(w->ahead, x1, x2, out, C, L, c0, p0, m, (int)((nb + OQ - 1) / OQ * (WH_D / OR)));
        for (int64_t k = 0; k < nb; k += OQ)
            for (int i = 0; i < WH_D; i += OR) {
                WV c[OR][OQ];
                WF(wh_ahead_request)(w->ahead, w->ahead->per);
                for (int r = 0; r < OR; r++) {
                    const WV zero = {0};
                    const WH_T b0 = bias ? bias[i + r] : (WH_T)0;
                    for (int q = 0; q < OQ; q++) c[r][q] = zero + b0;
                }
                for (int term = 0; term < (x2 ? 2 : 1); term++) {   /* M1 (x1 - mu1), then M2 (x2 - mu2) */
                    const WH_T *buf = term ? w->b : w->a, *M = term ? M2 : M1;
                    for (int j = 0; j < WH_D; j++) {
                        WV u[OQ];
                        for (int q = 0; q < OQ; q++) {
                            u[q] = *(const WV *)(buf + j * WCH + (k + q) * WVL);
                            NS_IN_REGISTER(u[q]);
                        }
                        for (int r = 0; r < OR; r++) {
                            const WH_T s = M[(i + r) * WH_D + j];
                            for (int q = 0; q < OQ; q++) c[r][q] += s * u[q];
                        }
                    }
                }
                for (int r = 0; r < OR; r++)
                    for (int q = 0; q < OQ; q++) *(WV *)(w->o + (i + r) * WCH + (k + q) * WVL) = c[r][q];
            }
        WF(wh_ahead_request)(w->ahead, WH_AHEAD_LINES);
        WF(wh_scatter)(w->o, C, L, c0, p0, cnt, out);
    }
}

/* ---- channels last: x[p C + c], a group's 16 channels at a position WCL_VECS vectors -------- */
#define WCL_VECS ((int)(WH_D / WVL))
typedef double WF(wh_vecd) __attribute__((vector_size(WH_VEC_BYTES / sizeof(WH_T) * sizeof(double))));
#define WVD WF(wh_vecd)   /* a vector's values in double */

/* sums[j] += the sum of x[p C + c0 + j] over positions [p0, p1) (blocks of WCL_FLUSH in WH_T) */
static void WF(wcl_sums)(const WH_T *x, int64_t C, int64_t c0, int64_t p0, int64_t p1, double *sums) {
    enum { NV = WCL_VECS };
    const WV zero = {0};
    for (int64_t b = p0; b < p1; b += WCL_FLUSH) {
        const int64_t e = b + WCL_FLUSH < p1 ? b + WCL_FLUSH : p1;
        WV acc[4][NV];
        for (int k = 0; k < 4; k++)
            for (int h = 0; h < NV; h++) acc[k][h] = zero;
        int64_t p = b;
        for (; p < e; p++) {   /* fours of positions into acc[0 .. 3], the rest into acc[0] */
            const int k = (p - b) / 4 * 4 + 4 <= e - b ? (int)((p - b) % 4) : 0;
            for (int h = 0; h < NV; h++) {
                WV v;
                memcpy(&v, x + p * C + c0 + h * WVL, sizeof v);
                acc[k][h] += v;
            }
        }
        for (int j = 0; j < WH_D; j++) {
            const int h = j / WVL, l = j % WVL;
            sums[j] += (double)((acc[0][h][l] + acc[1][h][l]) + (acc[2][h][l] + acc[3][h][l]));
        }
    }
}

/* out[16 i + j] += the sum over np positions of ca_i cb_j for the rows i0 .. i0 + WCL_ROWS - 1
 * and the vectors h >= h0 of j (a function of its own: inlined into wcl_cross, half of the
 * sums of products went through memory at every step) */
__attribute__((noinline))
static void WF(wcl_cross_rows)(const WV (*ca)[WCL_VECS], const WV (*cb)[WCL_VECS], int np, int i0, int h0,
                                double *out) {
    enum { NV = WCL_VECS };
    const WV zero = {0};
    WV acc[WCL_ROWS][NV];
    for (int r = 0; r < WCL_ROWS; r++)
        for (int h = 0; h < NV; h++) acc[r][h] = zero;
    for (int p = 0; p < np; p++) {
        WV v[NV];
        for (int h = 0; h < NV; h++) {
            v[h] = cb[p][h];
            if (WCL_ROWS * NV <= 8) NS_IN_REGISTER(v[h]);   /* (more sums than that spill anyway) */
        }
        for (int r = 0; r < WCL_ROWS; r++) {
            const WH_T s = ca[p][(i0 + r) / WVL][(i0 + r) % WVL];
            for (int h = 0; h < NV; h++)   /* (a whole count, so that acc stays in registers) */
                if (h >= h0) acc[r][h] += s * v[h];
        }
    }
    for (int r = 0; r < WCL_ROWS; r++)
        for (int h = h0; h < NV; h++) {
            double *o = out + (i0 + r) * WH_D + h * WVL;
            WVD d;
            memcpy(&d, o, sizeof d);
            d += __builtin_convertvector(acc[r][h], WVD);
            memcpy(o, &d, sizeof d);
        }
}

/* out[16 i + j] += the sum over positions [p0, p1) of (a_i - mu_a_i)(b_j - mu_b_j); asum[i]
 * (not NULL, mu_a NULL) += the sum of a_i; a == b with mu_a == mu_b: one load a position, and
 * only the vectors of j that hold a j >= i (the caller copies the rest from out[16 j + i]).
 * A block of WCL_FLUSH positions is centred into a buffer, then its rows i taken WCL_ROWS at
 * a time, a_i broadcast from the buffer. A position's 16 values are WCL_VECS vectors of the
 * target's width: as one 16-value vector (64 bytes, two registers with AVX2) the sums of
 * products went through memory at every step, this pass at 5-7x the channels-first one on
 * an AVX2 machine. */
static void WF(wcl_cross)(const WH_T *a, const WH_T *mu_a, const WH_T *b, const WH_T *mu_b, int64_t C,
                          int64_t c0, int64_t p0, int64_t p1, double *out, double *asum) {
    enum { NV = WCL_VECS };
    const int sym = a == b && mu_a == mu_b;
    const WV zero = {0};
    WV ma[NV], mb[NV], ca[WCL_FLUSH][NV], cbuf[WCL_FLUSH][NV];
    for (int h = 0; h < NV; h++) {
        ma[h] = mb[h] = zero;
        if (mu_a) memcpy(&ma[h], mu_a + c0 + h * WVL, sizeof(WV));
        if (mu_b) memcpy(&mb[h], mu_b + c0 + h * WVL, sizeof(WV));
    }
    WV (*cb)[NV] = sym ? ca : cbuf;
    for (int64_t blk = p0; blk < p1; blk += WCL_FLUSH) {
        const int np = (int)(blk + WCL_FLUSH < p1 ? WCL_FLUSH : p1 - blk);
        WV as[NV];
        for (int h = 0; h < NV; h++) as[h] = zero;
        for (int p = 0; p < np; p++)
            for (int h = 0; h < NV; h++) {
                WV v;
                memcpy(&v, a + (blk + p) * C + c0 + h * WVL, sizeof v);
                ca[p][h] = v - ma[h];
                as[h] += ca[p][h];
                if (!sym) {
                    memcpy(&v, b + (blk + p) * C + c0 + h * WVL, sizeof v);
                    cbuf[p][h] = v - mb[h];
                }
            }
        for (int i0 = 0; i0 < WH_D; i0 += WCL_ROWS)
            WF(wcl_cross_rows)(ca, cb, np, i0, sym ? i0 / WVL : 0, out);
        if (asum)
            for (int i = 0; i < WH_D; i++) asum[i] += (double)as[i / WVL][i % WVL];
    }
}

/* out[p C + c0 + i] = (M1 (x1 - mu1) + M2 (x2 - mu2) + bias)_i at positions [p0, p1) (M row-major
 * 16 x 16 and bias (16) of the group; x2 NULL: no second term; bias NULL: 0), four positions at
 * a time, M's columns as WCL_VECS vectors each (see wcl_cross) */
static void WF(wcl_apply)(const WH_T *x1, const WH_T *mu1, const WH_T *M1, const WH_T *x2, const WH_T *mu2,
                          const WH_T *M2, const WH_T *bias, int64_t C, int64_t c0, int64_t p0, int64_t p1,
                          WH_T *out) {
    enum { NV = WCL_VECS };
    const WV zero = {0};
    WV k1[WH_D][NV], k2[WH_D][NV], m1[NV], m2[NV], b0[NV];
    for (int j = 0; j < WH_D; j++)
        for (int i = 0; i < WH_D; i++) {
            k1[j][i / WVL][i % WVL] = M1[i * WH_D + j];
            k2[j][i / WVL][i % WVL] = x2 ? M2[i * WH_D + j] : (WH_T)0;
        }
    for (int h = 0; h < NV; h++) {
        m1[h] = m2[h] = b0[h] = zero;
        if (mu1) memcpy(&m1[h], mu1 + c0 + h * WVL, sizeof(WV));
        if (x2 && mu2) memcpy(&m2[h], mu2 + c0 + h * WVL, sizeof(WV));
        if (bias) memcpy(&b0[h], bias + h * WVL, sizeof(WV));
    }
    for (int64_t p = p0; p < p1; p += 4) {
        const int nq = p1 - p < 4 ? (int)(p1 - p) : 4;
        WV s[4][NV], acc[4][NV];
        for (int term = 0; term < (x2 ? 2 : 1); term++) {   /* M1 (x1 - mu1), then M2 (x2 - mu2) */
            const WH_T *x = term ? x2 : x1;
            const WV *m = term ? m2 : m1;
            WV (*k)[NV] = term ? k2 : k1;
            for (int q = 0; q < 4; q++)
                for (int h = 0; h < NV; h++) {
                    WV v = zero;
                    if (q < nq) memcpy(&v, x + (p + q) * C + c0 + h * WVL, sizeof v);
                    s[q][h] = q < nq ? v - m[h] : zero;
                    if (!term) acc[q][h] = b0[h];
                }
            for (int j = 0; j < WH_D; j++) {
                WV kj[NV];
                for (int h = 0; h < NV; h++) {
                    kj[h] = k[j][h];
                    NS_IN_REGISTER(kj[h]);
                }
                for (int q = 0; q < 4; q++) {
                    const WH_T sj = s[q][j / WVL][j % WVL];
                    for (int h = 0; h < NV; h++) acc[q][h] += sj * kj[h];
                }
            }
        }
        for (int q = 0; q < nq; q++)
            for (int h = 0; h < NV; h++) memcpy(out + (p + q) * C + c0 + h * WVL, &acc[q][h], sizeof(WV));
    }
}

/* what one call does to every group (see the two entry points): the forward's outputs mu,
 * cov, W, Wg are the backward's inputs; channels_last: x[n, l, c] (else x[n, c, l]) */
typedef struct {
    int backward, channels_last;
    int64_t N, C, L;
    int T;
    double eps;
    const WH_T *x, *dy, *gamma, *beta;
    WH_T *mu, *cov, *W, *Wg, *out, *dgamma, *dbeta;
} WF(wh_call);

/* after the sums of products of group g (sums = sum V V^T): Sigma = sums / m + eps I,
 * W = newton(Sigma), W' = diag(gamma) W (nt: the Newton iteration's scratch) */
static void WF(wh_forward_matrices)(const WF(wh_call) *q, int64_t g, const double *sums, WH_T *nt) {
    const int64_t c0 = g * WH_D, dd = WH_D * WH_D, m = q->N * q->L;
    WH_T *cov = q->cov + g * dd, *W = q->W + g * dd, *Wg = q->Wg + g * dd;
    for (int64_t i = 0; i < dd; i++)
        cov[i] = (WH_T)(sums[i] / (double)m) + (i % (WH_D + 1) == 0 ? (WH_T)q->eps : (WH_T)0);
    WF(nt_forward_one)(cov, NULL, WH_D, q->T, W, nt);
    for (int i = 0; i < WH_D; i++)
        for (int j = 0; j < WH_D; j++)
            Wg[i * WH_D + j] = q->gamma ? W[i * WH_D + j] * q->gamma[c0 + i] : W[i * WH_D + j];
}

/* after dW' = sums and rowsum(dy) = dysum of group g: dgamma = rowsum(dW' * W), dbeta,
 * dSigma = newton_backward(Sigma, diag(gamma) dW'), and the matrices of
 * dx = Wt dy + S (x - mu) + shift: Wt = W'^T, S = (dSigma + dSigma^T) / m, shift = -W'^T mean(dy)
 * (mats: Wt, S, shift in a row) */
static void WF(wh_backward_matrices)(const WF(wh_call) *q, int64_t g, const double *sums, const double *dysum,
                                     WH_T *nt, WH_T *mats) {
    const int64_t c0 = g * WH_D, dd = WH_D * WH_D, m = q->N * q->L;
    const WH_T *cov = q->cov + g * dd, *W = q->W + g * dd, *Wg = q->Wg + g * dd;
    WH_T *Wt = mats, *S = mats + dd, *shift = mats + 2 * dd;
    WH_T dW[WH_D * WH_D], dcov[WH_D * WH_D], dymean[WH_D];
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
}

#define WH_MATS (2 * WH_D * WH_D + WH_D)   /* Wt, S, shift */

/* (N, C, L): every step of a group in one thread, the groups split between threads */
static int WF(wh_run_channels_first)(const WF(wh_call) *q, int threads) {
    const int64_t G = q->C / WH_D;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        WF(wh_work) w = {NULL, NULL, NULL, NULL, NULL, NULL, NULL};
        WH_T *nt = (WH_T *)ns_thread_scratch(sizeof(WH_T) * (size_t)nt_scratch(WH_D, q->T), 0, &failed);
        const int ok = WF(wh_work_alloc)(&w) && nt;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < G; g++) {
            if (!ok) continue;
            const int64_t c0 = g * WH_D;
            double sums[WH_D * WH_D], dysum[WH_D];
            if (!q->backward) {
                WF(wh_means)(q->x, q->N, q->C, q->L, c0, &w, q->mu);
                WF(wh_cross_group)(q->x, q->mu, q->x, q->mu, q->N, q->C, q->L, c0, &w, sums, NULL);
                WF(wh_forward_matrices)(q, g, sums, nt);
                WF(wh_apply_group)(q->x, q->mu, q->Wg + g * WH_D * WH_D, NULL, NULL, NULL,
                                   q->beta ? q->beta + c0 : NULL, q->N, q->C, q->L, c0, &w, q->out);
            } else {
                WH_T mats[WH_MATS];
                WF(wh_cross_group)(q->dy, NULL, q->x, q->mu, q->N, q->C, q->L, c0, &w, sums, dysum);
                WF(wh_backward_matrices)(q, g, sums, dysum, nt, mats);
                WF(wh_apply_group)(q->dy, NULL, mats, q->x, q->mu, mats + WH_D * WH_D, mats + 2 * WH_D * WH_D,
                                   q->N, q->C, q->L, c0, &w, q->out);
            }
        }
        free(w.block);
        free(nt);
    }
    return failed ? -1 : 0;
}

/* (N, L, C): the positions in slabs of WCL_SLAB (more for over WCL_MAX_SLABS of them) split
 * between threads, every group of a slab in one thread; a sum over positions is one partial
 * sum per slab, added in slab order (the slabs depend on m alone, not on the threads) */
static int WF(wh_run_channels_last)(const WF(wh_call) *q, int threads) {
    const int64_t G = q->C / WH_D, C = q->C, dd = WH_D * WH_D, m = q->N * q->L;
    const int64_t least = (m + WCL_MAX_SLABS - 1) / WCL_MAX_SLABS;
    const int64_t slab = least > WCL_SLAB ? least : WCL_SLAB;
    const int64_t slabs = (m + slab - 1) / slab, per = G * (dd + WH_D);
    double *part = (double *)calloc((size_t)(slabs * per), sizeof(double));
    double *tot = (double *)calloc((size_t)per, sizeof(double));
    WH_T *mats = (WH_T *)malloc(sizeof(WH_T) * (size_t)(G * WH_MATS));
    int failed = !part || !tot || !mats;
    const WH_T *x = q->x;
    if (!failed && !q->backward) {   /* the means */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t s = 0; s < slabs; s++) {
            const int64_t p0 = s * slab, p1 = p0 + slab < m ? p0 + slab : m;
            for (int64_t g = 0; g < G; g++)
                WF(wcl_sums)(x, C, g * WH_D, p0, p1, part + s * per + G * dd + g * WH_D);
        }
        for (int64_t c = 0; c < C; c++) {
            double t = 0;
            for (int64_t s = 0; s < slabs; s++) t += part[s * per + G * dd + c];
            q->mu[c] = (WH_T)(t / (double)m);
        }
    }
    if (!failed) {   /* forward: sum V V^T; backward: sum dy V^T and sum dy */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t s = 0; s < slabs; s++) {
            const int64_t p0 = s * slab, p1 = p0 + slab < m ? p0 + slab : m;
            double *ps = part + s * per;
            memset(ps, 0, sizeof(double) * (size_t)per);
            for (int64_t g = 0; g < G; g++) {
                const int64_t c0 = g * WH_D;
                if (q->backward)
                    WF(wcl_cross)(q->dy, NULL, x, q->mu, C, c0, p0, p1, ps + g * dd, ps + G * dd + c0);
                else
                    WF(wcl_cross)(x, q->mu, x, q->mu, C, c0, p0, p1, ps + g * dd, NULL);
            }
        }
        for (int64_t s = 0; s < slabs; s++)
            for (int64_t i = 0; i < per; i++) tot[i] += part[s * per + i];
        if (!q->backward)   /* sum V V^T: the entries wcl_cross left, from their transposes */
            for (int64_t g = 0; g < G; g++)
                for (int i = 0; i < WH_D; i++)
                    for (int j = 0; j < i; j++) tot[g * dd + i * WH_D + j] = tot[g * dd + j * WH_D + i];
#pragma omp parallel num_threads(threads)
        {
            WH_T *nt = (WH_T *)ns_thread_scratch(sizeof(WH_T) * (size_t)nt_scratch(WH_D, q->T), 0, &failed);
#pragma omp for schedule(static)
            for (int64_t g = 0; g < G; g++) {
                if (!nt) continue;
                if (q->backward)
                    WF(wh_backward_matrices)(q, g, tot + g * dd, tot + G * dd + g * WH_D, nt, mats + g * WH_MATS);
                else
                    WF(wh_forward_matrices)(q, g, tot + g * dd, nt);
            }
            free(nt);
        }
    }
    if (!failed) {   /* y or dx */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t s = 0; s < slabs; s++) {
            const int64_t p0 = s * slab, p1 = p0 + slab < m ? p0 + slab : m;
            for (int64_t g = 0; g < G; g++) {
                const int64_t c0 = g * WH_D;
                if (q->backward) {
                    const WH_T *mg = mats + g * WH_MATS;
                    WF(wcl_apply)(q->dy, NULL, mg, x, q->mu, mg + dd, mg + 2 * dd, C, c0, p0, p1, q->out);
                } else {
                    WF(wcl_apply)(x, q->mu, q->Wg + g * dd, NULL, NULL, NULL, q->beta ? q->beta + c0 : NULL,
                                  C, c0, p0, p1, q->out);
                }
            }
        }
    }
    free(part);
    free(tot);
    free(mats);
    return failed ? -1 : 0;
}

static int WF(wh_run)(const WF(wh_call) *q, int threads) {
    return q->channels_last ? WF(wh_run_channels_last)(q, threads) : WF(wh_run_channels_first)(q, threads);
}

/* IterNorm's training forward of x, C a multiple of 16, laid out (N, C, L) or, channels_last,
 * (N, L, C): mu (C), cov = Sigma, W, Wg (C / 16, 16, 16), y in x's layout; gamma / beta (C)
 * may be NULL. -1 where a buffer cannot be allocated. */
int WF(ns_whiten_forward)(const WH_T *x, int64_t N, int64_t C, int64_t L, int channels_last, int T, double eps,
                          const WH_T *gamma, const WH_T *beta, WH_T *mu, WH_T *cov, WH_T *W, WH_T *Wg,
                          WH_T *y, int threads) {
    WF(wh_call) q = {0, channels_last, N, C, L, T, eps, x, NULL, gamma, beta, mu, cov, W, Wg, y, NULL, NULL};
    return WF(wh_run)(&q, threads);
}

/* its backward for dy (in x's layout): dx (x's layout), dgamma / dbeta (C; NULL: not computed) */
int WF(ns_whiten_backward)(const WH_T *x, const WH_T *dy, int64_t N, int64_t C, int64_t L, int channels_last,
                           int T, const WH_T *gamma, const WH_T *mu, const WH_T *cov, const WH_T *W,
                           const WH_T *Wg, WH_T *dx, WH_T *dgamma, WH_T *dbeta, int threads) {
    WF(wh_call) q = {1, channels_last, N, C, L, T, 0.0, x, dy, gamma, NULL, (WH_T *)mu, (WH_T *)cov,
                     (WH_T *)W, (WH_T *)Wg, dx, dgamma, dbeta};
    return WF(wh_run)(&q, threads);
}

#undef WH_MATS
#undef WCL_VECS
#undef WVD
#undef WCH
#undef WVL
#undef WV
#undef WF
#undef WH_CAT
#undef WH_CAT_
