// Training-forward kernels of onelayer's lean path (onelayer/policy/forward.py) with their backward: RMSNorm,
// the q/k/v split of one fused projection (per-head q/k RMSNorm, rotary, v), and SwiGLU. Each row's arithmetic
// is the same whatever the thread count (rows split over torch's intra-op threads); a weight's gradient is
// summed in fixed chunks of rows, the chunks added in order. Compiled with fused_decode.cpp into one module by
// onelayer/policy/fused.py; onelayer/policy/fused_ops.py checks them against the torch ops and times them.
// rows per partial sum of a weight gradient: fixed, so the sum is the same on any thread count; the sums are kept
// in double, so how the rows are split (over threads here, over processes by DDP) moves them less
static constexpr int64_t CHUNK = 64;

// the chunks' partial sums [C, ...] added in order (the same whatever the thread count)
static Tensor sum_chunks(const Tensor& part) {
  const int64_t C = part.size(0), n = part.numel() / std::max<int64_t>(1, C);
  auto out = at::zeros(part.sizes().slice(1), part.options());
  const double* p = part.data_ptr<double>(); double* o = out.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < n; ++i) o[i] += p[c * n + i];
  return out.to(at::kFloat);
}

// RMSNorm over the last dim of x [R, n] with weight w [n] (or empty): y = (x * rstd) * w. Returns y, rstd [R].
static void check_float(const Tensor& t, const char* what) {
  TORCH_CHECK(!t.defined() || !t.numel() || (t.scalar_type() == at::kFloat && t.device().is_cpu()), what, ": float32 CPU tensors only");
}

std::vector<Tensor> rms_fwd(Tensor x, Tensor w, double eps) {
  check_float(x, "rms_fwd"); check_float(w, "rms_fwd");
  x = x.contiguous();
  const int64_t n = x.size(-1), R = x.numel() / n;
  auto y = at::empty_like(x);
  auto rstd = at::empty({R}, x.options());
  const float* xp = x.data_ptr<float>(); float* yp = y.data_ptr<float>(); float* rp = rstd.data_ptr<float>();
  const float* wp = w.numel() ? w.data_ptr<float>() : nullptr;
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = xp + r * n; float* o = yp + r * n;
      float ss = 0.f;
#pragma omp simd reduction(+:ss)
      for (int64_t i = 0; i < n; ++i) ss += a[i] * a[i];
      const float inv = 1.f / std::sqrt(ss / (float)n + (float)eps);
      rp[r] = inv;
      if (wp) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = (a[i] * inv) * wp[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = a[i] * inv;
      }
    }
  });
  return {y, rstd};
}

// dx, dw of rms_fwd: xhat = x rstd, g = dy w, dx = rstd (g - xhat mean(g xhat)), dw = sum_rows dy xhat
std::vector<Tensor> rms_bwd(Tensor dy, Tensor x, Tensor w, Tensor rstd, bool need_dw) {
  dy = dy.contiguous(); x = x.contiguous();
  const int64_t n = x.size(-1), R = x.numel() / n;
  auto dx = at::empty_like(x);
  const float* xp = x.data_ptr<float>(); const float* gp = dy.data_ptr<float>(); const float* rp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  const float* wp = w.numel() ? w.data_ptr<float>() : nullptr;
  const int64_t C = (R + CHUNK - 1) / CHUNK;
  Tensor part = need_dw && wp ? at::zeros({C, n}, x.options().dtype(at::kDouble)) : Tensor();
  double* pp = part.defined() ? part.data_ptr<double>() : nullptr;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = pp ? pp + c * n : nullptr;
      for (int64_t r = c * CHUNK; r < std::min(R, (c + 1) * CHUNK); ++r) {
        const float* a = xp + r * n; const float* g = gp + r * n; float* o = dxp + r * n; const float inv = rp[r];
        float dot = 0.f;
        if (wp) {
#pragma omp simd reduction(+:dot)
          for (int64_t i = 0; i < n; ++i) dot += g[i] * wp[i] * a[i];
        } else {
#pragma omp simd reduction(+:dot)
          for (int64_t i = 0; i < n; ++i) dot += g[i] * a[i];
        }
        const float m = dot * inv / (float)n;  // mean(g w xhat)
        if (wp) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) o[i] = inv * (g[i] * wp[i] - a[i] * inv * m);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) o[i] = inv * (g[i] - a[i] * inv * m);
        }
        if (acc) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) acc[i] += g[i] * (a[i] * inv);
        }
      }
    }
  });
  Tensor dw = pp ? sum_chunks(part) : Tensor();
  return {dx, dw.defined() ? dw : at::empty({0}, x.options())};
}

// SwiGLU of gu [R, 2I] (gate | up): silu(g) u in one pass (`vexp`). The backward recomputes sigmoid(g) with
// the same expression (the same value, bit for bit) rather than reading a stored copy: one stream of memory
// less each way, and one [R, I] tensor less kept per block.
static inline float sigm(float g) { return 1.f / (1.f + vexp(-g)); }

Tensor swiglu_fwd(Tensor gu) {
  check_float(gu, "swiglu_fwd");
  gu = gu.contiguous();
  const int64_t I = gu.size(-1) / 2, R = gu.numel() / (2 * I);
  auto sizes = gu.sizes().vec(); sizes.back() = I;
  auto out = at::empty(sizes, gu.options());
  const float* p = gu.data_ptr<float>(); float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = p + r * 2 * I; const float* u = g + I; float* y = o + r * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) y[i] = g[i] * sigm(g[i]) * u[i];
    }
  });
  return out;
}

Tensor swiglu_bwd(Tensor dy, Tensor gu) {
  gu = gu.contiguous(); dy = dy.contiguous();
  const int64_t I = gu.size(-1) / 2, R = gu.numel() / (2 * I);
  auto d = at::empty_like(gu);
  const float* p = gu.data_ptr<float>(); const float* gp = dy.data_ptr<float>();
  float* dp = d.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = p + r * 2 * I; const float* u = g + I; const float* dyr = gp + r * I;
      float* dg = dp + r * 2 * I; float* du = dg + I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float s = sigm(g[i]);
        du[i] = dyr[i] * g[i] * s;
        dg[i] = dyr[i] * u[i] * s * (1.f + g[i] * (1.f - s));
      }
    }
  });
  return d;
}

// q/k/v from one projection qkv [R, (h+2kvh)d]: q and k RMS-normed per head (weights wq, wk [d], or empty:
// no norm) then rotated (cos, sin [R, d]; rotate_half convention); v copied. Returns q [R,h,d], k [R,kvh,d],
// v [R,kvh,d], rstd [R, h+kvh].
std::vector<Tensor> qkv_fwd(Tensor qkv, Tensor wq, Tensor wk, Tensor cos, Tensor sin, double eps, int64_t h, int64_t kvh, int64_t d) {
  check_float(qkv, "qkv_fwd"); check_float(wq, "qkv_fwd"); check_float(cos, "qkv_fwd"); check_float(sin, "qkv_fwd");
  TORCH_CHECK(d <= 1024 && d % 2 == 0 && qkv.dim() == 2 && qkv.size(1) == (h + 2 * kvh) * d, "qkv_fwd: unexpected shapes");
  qkv = qkv.contiguous(); cos = cos.contiguous(); sin = sin.contiguous();
  const int64_t R = qkv.size(0), W = (h + 2 * kvh) * d, half = d / 2;
  auto q = at::empty({R, h, d}, qkv.options()), k = at::empty({R, kvh, d}, qkv.options()), v = at::empty({R, kvh, d}, qkv.options());
  auto rstd = at::empty({R, h + kvh}, qkv.options());
  const bool norm = wq.numel() > 0;
  const float* src = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  const float* wqp = norm ? wq.data_ptr<float>() : nullptr; const float* wkp = norm ? wk.data_ptr<float>() : nullptr;
  float* qp = q.data_ptr<float>(); float* kp = k.data_ptr<float>(); float* vp = v.data_ptr<float>(); float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    float t[1024];
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cp + r * d; const float* s = sp + r * d;
      for (int64_t j = 0; j < h + kvh; ++j) {
        const float* a = src + r * W + j * d;
        const float* wn = j < h ? wqp : wkp;
        float inv = 1.f;
        if (norm) {
          float ss = 0.f;
#pragma omp simd reduction(+:ss)
          for (int64_t i = 0; i < d; ++i) ss += a[i] * a[i];
          inv = 1.f / std::sqrt(ss / (float)d + (float)eps);
          for (int64_t i = 0; i < d; ++i) t[i] = (a[i] * inv) * wn[i];
        } else {
          for (int64_t i = 0; i < d; ++i) t[i] = a[i];
        }
        rp[r * (h + kvh) + j] = inv;
        float* o = j < h ? qp + (r * h + j) * d : kp + (r * kvh + j - h) * d;
        for (int64_t i = 0; i < half; ++i) o[i] = t[i] * c[i] - t[i + half] * s[i];
        for (int64_t i = half; i < d; ++i) o[i] = t[i] * c[i] + t[i - half] * s[i];
      }
      std::copy(src + r * W + (h + kvh) * d, src + r * W + W, vp + r * kvh * d);
    }
  });
  return {q, k, v, rstd};
}

// backward of qkv_fwd: d qkv [R, W], d wq, d wk (empty without a norm)
std::vector<Tensor> qkv_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor qkv, Tensor wq, Tensor wk, Tensor cos, Tensor sin,
                            Tensor rstd, int64_t h, int64_t kvh, int64_t d) {
  dq = dq.contiguous(); dk = dk.contiguous(); dv = dv.contiguous(); qkv = qkv.contiguous();
  const int64_t R = qkv.size(0), W = (h + 2 * kvh) * d, half = d / 2;
  auto dqkv = at::empty_like(qkv);
  const bool norm = wq.numel() > 0;
  const int64_t C = (R + CHUNK - 1) / CHUNK;
  Tensor part = norm ? at::zeros({C, 2, d}, qkv.options().dtype(at::kDouble)) : Tensor();
  double* pp = norm ? part.data_ptr<double>() : nullptr;
  const float* src = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  const float* wqp = norm ? wq.data_ptr<float>() : nullptr; const float* wkp = norm ? wk.data_ptr<float>() : nullptr;
  const float* gq = dq.data_ptr<float>(); const float* gk = dk.data_ptr<float>(); const float* gv = dv.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>(); float* out = dqkv.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    float t[1024];
    for (int64_t cc = c0; cc < c1; ++cc) {
      for (int64_t r = cc * CHUNK; r < std::min(R, (cc + 1) * CHUNK); ++r) {
        const float* c = cp + r * d; const float* s = sp + r * d;
        for (int64_t j = 0; j < h + kvh; ++j) {
          const float* g = j < h ? gq + (r * h + j) * d : gk + (r * kvh + j - h) * d;
          // through the rotation: t = d(normed)
          for (int64_t i = 0; i < half; ++i) t[i] = g[i] * c[i] + g[i + half] * s[i + half];
          for (int64_t i = half; i < d; ++i) t[i] = g[i] * c[i] - g[i - half] * s[i - half];
          float* o = out + r * W + j * d;
          if (!norm) { for (int64_t i = 0; i < d; ++i) o[i] = t[i]; continue; }
          const float* a = src + r * W + j * d; const float* wn = j < h ? wqp : wkp; const float inv = rp[r * (h + kvh) + j];
          double* acc = pp + (cc * 2 + (j < h ? 0 : 1)) * d;
          float dot = 0.f;
#pragma omp simd reduction(+:dot)
          for (int64_t i = 0; i < d; ++i) dot += t[i] * wn[i] * a[i];
          const float m = dot * inv / (float)d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) { o[i] = inv * (t[i] * wn[i] - a[i] * inv * m); acc[i] += t[i] * (a[i] * inv); }
        }
        std::copy(gv + r * kvh * d, gv + (r + 1) * kvh * d, out + r * W + (h + kvh) * d);
      }
    }
  });
  if (!norm) return {dqkv, at::empty({0}, qkv.options()), at::empty({0}, qkv.options())};
  auto dw = sum_chunks(part);
  return {dqkv, dw[0], dw[1]};
}

