/* Bounded weight norm with p = 2, forward and backward (included by rows.c).
 *
 * A weight of R output channels (rows) of n values each, contiguous, row i = v_i:
 *
 *   nrm_i = max(||v_i||_2, tiny),   k_i = s_i / nrm_i,   w_i = k_i v_i
 *
 * (s_i = s[0] for one scale, s[i] for a learned gain). Backward, for g = dL/dw:
 *
 *   dot_i = g_i . v_i,   dL/dv_i = k_i g_i - (k_i dot_i / nrm_i^2) v_i,   dL/ds_i = dot_i / nrm_i
 *
 * One row at a time: its sum over the row, then its output while the row is still in cache,
 * so the weight is read from memory once each way (PyTorch's norm, then the multiply, read
 * it twice forward; the backward's product, sum and two updates four times and wrote three
 * temporaries). A row's sum is eight (four) vector lanes of partial sums in a fixed order,
 * then the lanes, so the results do not depend on the thread count. */

#define NS_BWN(T_, SUF_)                                                                             \
static T_ bwn_dot_##SUF_(const T_ *restrict a, const T_ *restrict b, int64_t n) {                    \
    T_ p[8] = {0, 0, 0, 0, 0, 0, 0, 0}, t = 0;                                                       \
    int64_t i = 0;                                                                                   \
    for (; i + 8 <= n; i += 8)                                                                       \
        for (int j = 0; j < 8; j++) p[j] += a[i + j] * b[i + j];                                     \
    for (; i < n; i++) t += a[i] * b[i];                                                             \
    return (((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))) + t;                  \
}                                                                                                    \
                                                                                                     \
/* w, nrm and k (R values each) from v */                                                           \
int ns_bwn_forward_##SUF_(const T_ *v, int64_t R, int64_t n, const T_ *s, int s_per_row, double tiny, \
                          T_ *w, T_ *nrm, T_ *k, int threads) {                                      \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                \
    for (int64_t i = 0; i < R; i++) {                                                                \
        const T_ *vi = v + i * n;                                                                    \
        T_ norm = (T_)sqrt((double)bwn_dot_##SUF_(vi, vi, n));                                       \
        if (!(norm >= (T_)tiny)) norm = norm != norm ? norm : (T_)tiny; /* clamp_min, NaN kept */    \
        const T_ ki = s[s_per_row ? i : 0] / norm;                                                   \
        nrm[i] = norm;                                                                               \
        k[i] = ki;                                                                                   \
        T_ *wi = w + i * n;                                                                          \
        for (int64_t j = 0; j < n; j++) wi[j] = vi[j] * ki;                                          \
    }                                                                                                \
    return 0;                                                                                        \
}                                                                                                    \
                                                                                                     \
/* gv = dL/dv (may be NULL) and dot (R values) from g, v, nrm, k */                                 \
int ns_bwn_backward_##SUF_(const T_ *g, const T_ *v, int64_t R, int64_t n, const T_ *nrm, const T_ *k, \
                           T_ *gv, T_ *dot, int threads) {                                           \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                \
    for (int64_t i = 0; i < R; i++) {                                                                \
        const T_ *gi = g + i * n, *vi = v + i * n;                                                   \
        const T_ d = bwn_dot_##SUF_(gi, vi, n);                                                      \
        dot[i] = d;                                                                                  \
        if (gv) {                                                                                    \
            const T_ ki = k[i], c = ki * d / (nrm[i] * nrm[i]);                                      \
            T_ *o = gv + i * n;                                                                      \
            for (int64_t j = 0; j < n; j++) o[j] = ki * gi[j] - c * vi[j];                           \
        }                                                                                            \
    }                                                                                                \
    return 0;                                                                                        \
}

NS_BWN(float, f32)
NS_BWN(double, f64)
#undef NS_BWN
