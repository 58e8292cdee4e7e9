/* LoRA-RITE optimizer step, fused, for CUDA GPUs: one launch updates every (A, B) pair of a bucket.
 *
 * Yen et al., "LoRA Done RITE" (ICLR 2025, arXiv:2410.20625), Algorithm 1; the notation and every formula are
 * those of kernels/lora_rite.py's module docstring. This is the GPU twin of kernels/lora_rite_cpu.c (same
 * arguments, same state layout, same r×r algebra, ported from its 4-lane vectors to one thread per factor);
 * the batched torch route (`implementation="torch"`) is the reference of both: tests/kernels/test_lora_rite_cpu.py
 * on a CUDA device, and tests/kernels/test_lora_rite_cuda_emulated.py everywhere (this device code compiled for the
 * host under an emulation of the CUDA features it uses — keep to those: see tests/kernels/cuda_emulation/emu.h).
 *
 * Compiled at first use by kernels/cbuild.py with nvcc, -DRANK=<r> -DREAL=<float|double> and the device's
 * architecture, cached per machine; loaded with ctypes (no torch headers, no Python extension module).
 *
 * Why a kernel: on a GPU the torch route is a few hundred small launches and three waits for the device a step
 * (3.6 ms for 48 pairs on an H100, bound by the host), while torch's fused AdamW is a handful of launches
 * (0.5 ms). Here one block per pair does, in one launch:
 *   1. per factor, Z_t into the history slot of parity t % 2 and the Grams Z_t Z_tᵀ, Z_t Z_{t-1}ᵀ, G Gᵀ
 *      (all threads, accumulated in REAL as the torch route's bmm, reduced across the block);
 *   2. the r×r algebra in float64, one thread per factor (the A side in warp 0, the B side in warp 1):
 *      R⁻¹ (Cholesky, or the eigendecomposition pseudo-inverse for (near-)singular Grams), P, ḡᵀḡ, the
 *      transported second moment with escaped mass, K = (V̂ + ρ̂I)^{-1/2} (Jacobi, round-robin order);
 *   3. per factor, one pass: Mᵀ ← [β₁P, C'ᵀ] [Mᵀ; G], ΔZ = s R⁻¹ Mᵀ (s = lr/bc₁), Z ← (1 - lr·wd) Z - ΔZ.
 *
 * Addresses (int64, of contiguous device tensors): `operands`, 4 per pair: A, B, grad A, grad B; `state`, 12 per
 * pair, for A (0..5) and B (6..11): step (float32 scalar), exp_avg (the factor's shape, REAL), exp_avg_sq (r×r
 * double), escaped (double scalar), history (2 × the factor's shape, REAL), prev_rinv (r×r double). `hyper`: 5
 * doubles per pair (lr, β₁, β₂, ε, weight decay). `lam`: (2·npairs, r) doubles, each factor's λ(V) (A rows
 * first), valid if `lam_known`.
 */
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cuda_runtime.h>

#ifndef RANK
#error "compile with -DRANK=<LoRA rank>"
#endif
#ifndef REAL
#define REAL float
#endif

#define R RANK
#ifndef THREADS
#define THREADS 256 /* any multiple of 32 from 64 on (threads 0 and 32 run the two algebras) */
#endif
#define WARPS (THREADS / 32)
#define NSYM (R * (R + 1) / 2)
typedef REAL real;
typedef double mat[R][R];

/* ---------------------------------------------------------------------------------------------------------- */
/* the r×r algebra of one factor (a scalar port of side_algebra4 in lora_rite_cpu.c)                          */
/* ---------------------------------------------------------------------------------------------------------- */

__device__ static void mat_mul(mat out, const mat a, const mat b) { /* out = a b */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double acc = a[i][0] * b[0][j];
            for (int k = 1; k < R; k++) acc += a[i][k] * b[k][j];
            out[i][j] = acc;
        }
}

__device__ static void mat_tmul(mat out, const mat a, const mat b) { /* out = aᵀ b */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double acc = a[0][i] * b[0][j];
            for (int k = 1; k < R; k++) acc += a[k][i] * b[k][j];
            out[i][j] = acc;
        }
}

__device__ static void mat_mult(mat out, const mat a, const mat b) { /* out = a bᵀ */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double acc = a[i][0] * b[j][0];
            for (int k = 1; k < R; k++) acc += a[i][k] * b[j][k];
            out[i][j] = acc;
        }
}

/* Eigendecomposition of a symmetric matrix by Jacobi rotations in round-robin order (Golub & Van Loan, §8.5.5),
 * as eigh4 in lora_rite_cpu.c. `a` is destroyed. Out: w ascending and, if q is not NULL, the eigenvectors as
 * q's columns in that order; `vt` is scratch. */
#define PLAYERS (R + (R & 1))
__device__ static void eigh(mat a, double w[R], mat q, mat vt) {
    int pos[PLAYERS];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) vt[i][j] = i == j;
    for (int i = 0; i < PLAYERS; i++) pos[i] = i;
    const double eps2 = DBL_EPSILON * DBL_EPSILON;
    for (int sweep = 0; sweep < 60; sweep++) {
        double off = 0.0, diag = 0.0;
        for (int i = 0; i < R; i++) {
            diag += a[i][i] * a[i][i];
            for (int j = i + 1; j < R; j++) off += a[i][j] * a[i][j];
        }
        if (off <= eps2 * diag || off < DBL_MIN) break;
        for (int round = 0; round < PLAYERS - 1; round++) {
            int pp[PLAYERS / 2], qq[PLAYERS / 2];
            double cs[PLAYERS / 2], sn[PLAYERS / 2], dp[PLAYERS / 2], dq[PLAYERS / 2], zero[PLAYERS / 2];
#pragma unroll
            for (int k = 0; k < PLAYERS / 2; k++) {
                int p = pos[k], r = pos[PLAYERS - 1 - k];
                if (p > r) { int x = p; p = r; r = x; }
                if (r >= R) r = p; /* the phantom player of an odd r: no rotation */
                pp[k] = p; qq[k] = r;
                if (p == r) continue;
                double apr = a[p][r], app = a[p][p], arr = a[r][r];
                /* rotate unless apr is negligible beside the diagonal, or tiny (then c = 1, s = 0: a no-op) */
                bool rot = !(apr * apr <= eps2 * 1e-2 * fabs(app * arr)) && !(fabs(apr) <= DBL_MIN);
                double safe = rot ? apr : 1.0;
                double theta = (arr - app) / (2.0 * safe);
                double t = rot ? (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0)) : 0.0;
                double c = 1.0 / sqrt(t * t + 1.0);
                cs[k] = c; sn[k] = t * c;
                dp[k] = app - t * apr; dq[k] = arr + t * apr;
                zero[k] = rot ? 0.0 : apr;
            }
            /* a ← Jᵀ a J entry by entry, each symmetric pair of entries once (see eigh4) */
            for (int k = 0; k < PLAYERS / 2; k++) {
                int p = pp[k], r = qq[k];
                if (p == r) continue;
                double ck = cs[k], sk = sn[k];
                for (int l = 0; l < PLAYERS / 2; l++) {
                    int u = pp[l], w2 = qq[l];
                    if (l == k || (u != w2 && l < k)) continue;
                    double apu = a[p][u], aru = a[r][u];
                    double bpu = ck * apu - sk * aru, bru = sk * apu + ck * aru; /* rows p, r turned */
                    if (u == w2) { /* u unpaired: its column is not turned */
                        a[p][u] = a[u][p] = bpu;
                        a[r][u] = a[u][r] = bru;
                        continue;
                    }
                    double apw = a[p][w2], arw = a[r][w2];
                    double bpw = ck * apw - sk * arw, brw = sk * apw + ck * arw;
                    double cl = cs[l], sl = sn[l]; /* then columns u, w */
                    a[p][u] = a[u][p] = cl * bpu - sl * bpw;
                    a[p][w2] = a[w2][p] = sl * bpu + cl * bpw;
                    a[r][u] = a[u][r] = cl * bru - sl * brw;
                    a[r][w2] = a[w2][r] = sl * bru + cl * brw;
                }
                a[p][p] = dp[k];
                a[r][r] = dq[k];
                a[p][r] = a[r][p] = zero[k];
                if (q)
                    for (int j = 0; j < R; j++) { /* vt ← Jᵀ vt */
                        double x = vt[p][j], y = vt[r][j];
                        vt[p][j] = ck * x - sk * y;
                        vt[r][j] = sk * x + ck * y;
                    }
            }
            int last = pos[PLAYERS - 1]; /* next round: player 0 stays, the others move one seat */
#pragma unroll
            for (int k = PLAYERS - 1; k > 1; k--) pos[k] = pos[k - 1];
            pos[1] = last;
        }
    }
    int order[R];
    for (int i = 0; i < R; i++) order[i] = i;
    for (int i = 1; i < R; i++) { /* insertion sort by eigenvalue */
        int o = order[i], j = i;
        while (j > 0 && a[order[j - 1]][order[j - 1]] > a[o][o]) { order[j] = order[j - 1]; j--; }
        order[j] = o;
    }
    for (int i = 0; i < R; i++) w[i] = a[order[i]][order[i]];
    if (q)
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++) q[i][j] = vt[order[j]][i];
}

/* R⁻¹ for a Gram Z Zᵀ = RᵀR: L⁻ᵀ from the Cholesky factor where every pivot² > rel_tol · trace, else the
 * pseudo-inverse Q Λ^{-1/2} with directions λ ≤ rel_tol · λ_max dropped (as inv_factor4). `ws`: 3 scratch
 * matrices. */
__device__ static void inv_factor(const mat gram, double rel_tol, mat rinv, mat *ws) {
    double(*l)[R] = ws[0];
    double trace = 0.0;
    bool ok = true;
    for (int i = 0; i < R; i++) trace += gram[i][i];
    for (int j = 0; j < R; j++) {
        double d = gram[j][j];
        for (int k = 0; k < j; k++) d -= l[j][k] * l[j][k];
        if (!(d > trace * rel_tol)) ok = false; /* pivot² ≤ rel_tol · trace, or NaN: singular */
        double ljj = sqrt(d > DBL_MIN ? d : DBL_MIN);
        l[j][j] = ljj;
        for (int i = j + 1; i < R; i++) {
            double s = gram[i][j];
            for (int k = 0; k < j; k++) s -= l[i][k] * l[j][k];
            l[i][j] = s / ljj;
        }
        for (int i = 0; i < j; i++) l[i][j] = 0.0;
    }
    if (ok) {
        for (int c = 0; c < R; c++) /* rinv = L⁻ᵀ: back substitution, column by column */
            for (int i = R - 1; i >= 0; i--) {
                if (i > c) { rinv[i][c] = 0.0; continue; }
                double s = i == c ? 1.0 : 0.0;
                for (int k = i + 1; k <= c; k++) s -= l[k][i] * rinv[k][c];
                rinv[i][c] = s / l[i][i];
            }
        return;
    }
    double(*a)[R] = ws[0], (*q)[R] = ws[1];
    double w[R];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) a[i][j] = gram[i][j];
    eigh(a, w, q, ws[2]);
    double cut = (w[R - 1] > 0.0 ? w[R - 1] : 0.0) * rel_tol;
    for (int j = 0; j < R; j++) {
        double f = w[j] > cut ? 1.0 / sqrt(w[j] > DBL_MIN ? w[j] : DBL_MIN) : 0.0;
        for (int i = 0; i < R; i++) rinv[i][j] = q[i][j] * f;
    }
}

/* One factor's algebra (side s, partner o): reads the partner's Gram, cross product and last R⁻¹ and its own
 * G Gᵀ; updates V, ρ, λ(V) in place; writes top = [β₁P, C'ᵀ] (r×2r), step = lr/bc₁ R_o⁻¹ and R_o⁻¹. The
 * matrices live in `ws` (WS_MATS r×r doubles of the block's shared memory: dynamic indexing is free there). */
#define WS_MATS 13
__device__ static void side_algebra(const mat gram, const mat cross, const double *rprev_g, const mat gg,
                                    double *v_g, double *rho_g, double *lam_g, const double *hyper, double t,
                                    double n_s, int lam_known, double rel_tol, real top[R][2 * R],
                                    real step[R][R], mat rinv, mat *ws) {
    double(*v)[R] = ws[0], (*rprev)[R] = ws[1], (*tmp)[R] = ws[2], (*p)[R] = ws[3], (*s)[R] = ws[4];
    double(*vm)[R] = ws[5], (*vn)[R] = ws[6], (*kmat)[R] = ws[7], (*c)[R] = ws[8], (*q)[R] = ws[9];
    mat *scratch = ws + 10;
    double lam[R], w[R];
    const double lr = hyper[0], beta1 = hyper[1], beta2 = hyper[2], eps = hyper[3];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) { v[i][j] = v_g[i * R + j]; rprev[i][j] = rprev_g[i * R + j]; }
    inv_factor(gram, rel_tol, rinv, scratch);
    mat_tmul(tmp, rinv, cross);
    mat_mul(p, tmp, rprev);
    mat_tmul(tmp, rinv, gg);
    mat_mul(s, tmp, rinv);

    if (lam_known) {
        for (int i = 0; i < R; i++) lam[i] = lam_g[i];
    } else {
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++) tmp[i][j] = 0.5 * (v[i][j] + v[j][i]);
        eigh(tmp, lam, nullptr, scratch[0]);
    }
    mat_mul(tmp, p, v); /* V moved into the current basis: P V Pᵀ */
    mat_mult(vm, tmp, p);
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) tmp[i][j] = 0.5 * (vm[i][j] + vm[j][i]);
    eigh(tmp, w, nullptr, scratch[0]);
    double eig_gap = -INFINITY, trace_gap = 0.0;
    for (int i = 0; i < R; i++) {
        eig_gap = fmax(eig_gap, lam[i] - w[i]);
        trace_gap += v[i][i] - vm[i][i];
    }
    double gap = fmin(eig_gap, trace_gap);
    double rho = beta2 * (*rho_g + (gap > 0.0 ? gap : 0.0));

    double sscale = 0.5 * (1.0 - beta2) / n_s, vscale = 0.5 * beta2;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) tmp[i][j] = s[i][j] * sscale + vm[i][j] * vscale;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) vn[i][j] = tmp[i][j] + tmp[j][i]; /* sym((1-β₂) ḡᵀḡ/n_s + β₂ P V Pᵀ) */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) v_g[i * R + j] = vn[i][j];
    *rho_g = rho;

    double bc1 = 1.0 - pow(beta1, t), bc2 = 1.0 - pow(beta2, t);
    eigh(vn, w, q, scratch[0]); /* λ kept for the next step */
    double inv[R];
    for (int i = 0; i < R; i++) {
        inv[i] = (1.0 - beta1) / (sqrt(((w[i] > 0.0 ? w[i] : 0.0) + rho) / bc2) + eps);
        lam_g[i] = w[i];
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double acc = 0.0;
            for (int k = 0; k < R; k++) acc += q[i][k] * inv[k] * q[j][k];
            kmat[i][j] = acc; /* (1-β₁) (V̂ + ρ̂ I)^{-1/2} */
        }
    mat_mul(c, rinv, kmat); /* C' = (1-β₁) R_o⁻¹ K */
    double step_scale = lr / bc1;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            top[i][j] = (real)(beta1 * p[i][j]);
            top[i][R + j] = (real)c[j][i];
            step[i][j] = (real)(rinv[i][j] * step_scale);
        }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* the kernel: one block per pair                                                                             */
/* ---------------------------------------------------------------------------------------------------------- */

/* Sum COUNT per-thread values (registers) over the block — warp shuffles, then the warps in a fixed order — into
 * out[] (shared). */
template <int COUNT>
__device__ __forceinline__ static void block_sum(real (&acc)[COUNT], real *red, double *out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int e = 0; e < COUNT; e++) {
        real x = acc[e];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
        if (lane == 0) red[warp * COUNT + e] = x;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < COUNT; e += THREADS) {
        real x = red[e];
        for (int w = 1; w < WARPS; w++) x += red[w * COUNT + e];
        out[e] = (double)x;
    }
    __syncthreads();
}

/* Element (i, k) of the wide Z (r×n): A (r×n_in, row-major) as is; B (n_out×r, row-major) as Z_B = Bᵀ. */
__device__ static inline int64_t at(int tall, int64_t n, int i, int64_t k) { return tall ? k * R + i : i * n + k; }

__global__ void __launch_bounds__(THREADS) lora_rite_kernel(int64_t npairs, int64_t n_in, int64_t n_out,
                                                            const int64_t *operands, const int64_t *state,
                                                            const double *hyper, double *lam, int lam_known,
                                                            double rel_tol) {
    const int64_t pi = blockIdx.x;
    const int tid = threadIdx.x;
    __shared__ double s_gram[2][R][R], s_cross[2][R][R], s_gg[2][R][R], s_rinv[2][R][R];
    __shared__ double s_sym[2 * NSYM], s_t[2];
    __shared__ real s_top[2][R][2 * R], s_step[2][R][R];
    __shared__ real s_red[WARPS * (R * R > 2 * NSYM ? R * R : 2 * NSYM)];
    extern __shared__ double s_ws[]; /* 2 × WS_MATS r×r matrices: the two algebras' workspaces */
    const int64_t *ops = operands + 4 * pi;
    const int64_t *st = state + 12 * pi;

    if (tid == 0)
        for (int f = 0; f < 2; f++) {
            float *stepc = (float *)(intptr_t)st[6 * f];
            s_t[f] = (double)(*stepc += 1.0f);
        }
    __syncthreads();

    /* 1. history copy and Grams, per factor */
    for (int f = 0; f < 2; f++) {
        const int64_t n = f ? n_out : n_in, size = n * R;
        const real *z = (const real *)(intptr_t)ops[f];
        const real *g = (const real *)(intptr_t)ops[2 + f];
        real *hist = (real *)(intptr_t)st[6 * f + 4];
        const int h = (int)(((int64_t)s_t[f]) % 2);
        real *cur = hist + h * size;
        const real *prev = hist + (1 - h) * size;
        real acc[2 * NSYM];
#pragma unroll
        for (int e = 0; e < 2 * NSYM; e++) acc[e] = 0;
        for (int64_t k = tid; k < n; k += THREADS) {
            real zk[R], gk[R];
#pragma unroll
            for (int i = 0; i < R; i++) {
                const int64_t ix = at(f, n, i, k);
                zk[i] = z[ix];
                gk[i] = g[ix];
                cur[ix] = zk[i];
            }
#pragma unroll
            for (int i = 0; i < R; i++)
#pragma unroll
                for (int j = 0; j <= i; j++) {
                    const int e = i * (i + 1) / 2 + j;
                    acc[e] += zk[i] * zk[j];
                    acc[NSYM + e] += gk[i] * gk[j];
                }
        }
        block_sum(acc, s_red, s_sym);
        if (tid == 0) {
            int e = 0;
            for (int i = 0; i < R; i++)
                for (int j = 0; j <= i; j++, e++) {
                    s_gram[f][i][j] = s_gram[f][j][i] = s_sym[e];
                    s_gg[f][i][j] = s_gg[f][j][i] = s_sym[NSYM + e];
                }
        }
        real acc2[R * R];
#pragma unroll
        for (int e = 0; e < R * R; e++) acc2[e] = 0;
        for (int64_t k = tid; k < n; k += THREADS) {
            real zk[R], pk[R];
#pragma unroll
            for (int i = 0; i < R; i++) {
                const int64_t ix = at(f, n, i, k);
                zk[i] = z[ix];
                pk[i] = prev[ix];
            }
#pragma unroll
            for (int i = 0; i < R; i++)
#pragma unroll
                for (int j = 0; j < R; j++) acc2[i * R + j] += zk[i] * pk[j];
        }
        block_sum(acc2, s_red, &s_cross[f][0][0]);
    }

    /* 2. the r×r algebra: thread 0 for A (partner B), thread 32 for B (partner A) */
    if (tid == 0 || tid == 32) {
        const int f = tid ? 1 : 0, o = 1 - f;
        const int64_t *sf = st + 6 * f, *so = st + 6 * o;
        side_algebra(s_gram[o], s_cross[o], (const double *)(intptr_t)so[5], s_gg[f], (double *)(intptr_t)sf[2],
                     (double *)(intptr_t)sf[3], lam + (f * npairs + pi) * R, hyper + 5 * pi, s_t[f],
                     (double)(f ? n_out : n_in), lam_known, rel_tol, s_top[f], s_step[f], s_rinv[o],
                     (mat *)(s_ws + f * WS_MATS * R * R));
    }
    __syncthreads();
    for (int e = tid; e < 2 * R * R; e += THREADS) { /* R⁻¹ now is the next step's previous one */
        const int f = e / (R * R), ij = e % (R * R);
        ((double *)(intptr_t)st[6 * f + 5])[ij] = (&s_rinv[f][0][0])[ij];
    }

    /* 3. updates: m ← top [m; g], z ← keep·z − step m (per column k of the wide layout) */
    const real keep = (real)(1.0 - hyper[5 * pi] * hyper[5 * pi + 4]);
    for (int f = 0; f < 2; f++) {
        const int64_t n = f ? n_out : n_in;
        real *z = (real *)(intptr_t)ops[f];
        const real *g = (const real *)(intptr_t)ops[2 + f];
        real *m = (real *)(intptr_t)st[6 * f + 1];
        for (int64_t k = tid; k < n; k += THREADS) {
            real in[2 * R], om[R];
#pragma unroll
            for (int j = 0; j < R; j++) {
                const int64_t ix = at(f, n, j, k);
                in[j] = m[ix];
                in[R + j] = g[ix];
            }
#pragma unroll
            for (int i = 0; i < R; i++) {
                real acc = 0;
#pragma unroll
                for (int j = 0; j < 2 * R; j++) acc += s_top[f][i][j] * in[j];
                om[i] = acc;
                m[at(f, n, i, k)] = acc;
            }
#pragma unroll
            for (int i = 0; i < R; i++) {
                real od = 0;
#pragma unroll
                for (int j = 0; j < R; j++) od += s_step[f][i][j] * om[j];
                const int64_t ix = at(f, n, i, k);
                z[ix] = keep * z[ix] - od;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* entry point                                                                                                */
/* ---------------------------------------------------------------------------------------------------------- */

static cudaError_t launch(int64_t npairs, int64_t n_in, int64_t n_out, const int64_t *operands_host,
                          int64_t *operands_dev, const int64_t *state_dev, const double *hyper_host,
                          double *hyper_dev, double *lam, int64_t lam_known, double rel_tol, cudaStream_t s) {
    cudaError_t err;
    err = cudaMemcpyAsync(operands_dev, operands_host, sizeof(int64_t) * 4 * npairs, cudaMemcpyHostToDevice, s);
    if (err != cudaSuccess) return err;
    err = cudaMemcpyAsync(hyper_dev, hyper_host, sizeof(double) * 5 * npairs, cudaMemcpyHostToDevice, s);
    if (err != cudaSuccess) return err;
    const size_t ws_bytes = sizeof(double) * 2 * WS_MATS * R * R;
    static bool attribute_set = false; /* shared memory beyond 48 KB needs an opt-in (r = 16: ~53 KB) */
    if (!attribute_set) {
        err = cudaFuncSetAttribute(lora_rite_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ws_bytes);
        if (err != cudaSuccess) return err;
        attribute_set = true;
    }
    lora_rite_kernel<<<(unsigned)npairs, THREADS, ws_bytes, s>>>(npairs, n_in, n_out, operands_dev, state_dev,
                                                                 hyper_dev, lam, (int)lam_known, rel_tol);
    return cudaGetLastError();
}

/* One step for `npairs` pairs of shapes A (r, n_in), B (n_out, r) on `device`, in stream order on `stream`
 * (torch's current stream). `operands_host` / `hyper_host` (4 int64 / 5 doubles per pair) are copied into the
 * device buffers `operands_dev` / `hyper_dev` first (from pageable memory: staged before this returns, so the
 * caller may rewrite them at once). `state_dev`: 12 int64 per pair (device memory). Returns 0, or a CUDA error
 * code (nothing is launched after a failed copy). */
extern "C" int lora_rite_step_cuda(int64_t npairs, int64_t n_in, int64_t n_out, const int64_t *operands_host,
                                   int64_t *operands_dev, const int64_t *state_dev, const double *hyper_host,
                                   double *hyper_dev, double *lam, int64_t lam_known, double rel_tol, void *stream,
                                   int64_t device) {
    int previous = 0;
    cudaError_t err = cudaGetDevice(&previous);
    if (err == cudaSuccess && previous != (int)device) err = cudaSetDevice((int)device);
    if (err != cudaSuccess) return (int)err;
    err = launch(npairs, n_in, n_out, operands_host, operands_dev, state_dev, hyper_host, hyper_dev, lam, lam_known,
                 rel_tol, (cudaStream_t)stream);
    if (previous != (int)device) cudaSetDevice(previous); /* the caller's current device is left as it was */
    return (int)err;
}

/* The name of a CUDA error code (for the Python side's messages). */
extern "C" const char *lora_rite_cuda_error(int code) { return cudaGetErrorString((cudaError_t)code); }
