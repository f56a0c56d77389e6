// A layer call's inputs and output moved by the layer's own CUDA graph.
//
// The hook writes the addresses of the caller's q, k_new, v_new and of the output tensor
// (with their dtypes) into the layer's pinned parameter block, which the graph copies in
// first; these kernels then read and write the caller's tensors directly. The host queues
// one graph launch per layer instead of four copies besides it: each CUDA call costs the
// host several microseconds, and at 32k tokens the host's time per layer is what bounds
// a decode step.
//
// io (int64 [IO_WORDS]): q, k_new, v_new, out addresses; q dtype, out dtype (0 fp32, 1 bf16).
#include "common.cuh"

#define IO_Q 0
#define IO_K 1
#define IO_V 2
#define IO_OUT 3
#define IO_Q_DTYPE 4
#define IO_OUT_DTYPE 5

// q [nq] (fp32 or bf16) -> fp32; k_new, v_new [nkv] bf16 bits, copied as they are. No
// __restrict__ on the buffers: a host-tensor call names the buffers themselves in io (each
// element is copied onto itself).
__global__ void stage_inputs(const long long* __restrict__ io, float* q, bf16_t* k_new, bf16_t* v_new,
                             int nq, int nkv)
{
    const float* q_f32 = reinterpret_cast<const float*>(io[IO_Q]);
    const bf16_t* q_bf16 = reinterpret_cast<const bf16_t*>(io[IO_Q]);
    const bf16_t* k_src = reinterpret_cast<const bf16_t*>(io[IO_K]);
    const bf16_t* v_src = reinterpret_cast<const bf16_t*>(io[IO_V]);
    const bool q_is_bf16 = io[IO_Q_DTYPE] == 1;
    const int n = max(nq, nkv);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (i < nq) q[i] = q_is_bf16 ? bf16_to_f32(q_bf16[i]) : q_f32[i];
        if (i < nkv) {
            k_new[i] = k_src[i];
            v_new[i] = v_src[i];
        }
    }
}

// out [n] fp32 -> the caller's output (fp32, or bf16 rounded to nearest even as torch does).
__global__ void stage_output(const long long* __restrict__ io, const float* out, int n)
{
    const bool to_bf16 = io[IO_OUT_DTYPE] == 1;
    float* dst_f32 = reinterpret_cast<float*>(io[IO_OUT]);
    bf16_t* dst_bf16 = reinterpret_cast<bf16_t*>(io[IO_OUT]);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (to_bf16) dst_bf16[i] = f32_to_bf16(out[i]);
        else dst_f32[i] = out[i];
    }
}
