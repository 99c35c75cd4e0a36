// Plain parameter structs: the only thing the op layer (csrc/ops/) hands to a CPU or CUDA
// implementation. No torch, no CUDA types: a kernel file includes this and nothing of ATen.
//
// NOTES:
// - Every pointer is already offset to element 0 of its tensor; every stride is in elements of
//   that tensor's dtype (bytes for e4m3 and uint8). The op layer guarantees the contiguity each
//   field's comment states, so implementations never re-check it.
// - Sizes and strides that multiply into an [S, N] offset are int64_t: 200K x 200K > 2^31.
// - bf16 data travels as uint16_t bit patterns so that host code needs no CUDA header.
#pragma once

#include <cstdint>

namespace indexcache {

// Tokens per page of every paged cache this package reads or writes (DeepGEMM's and FlashMLA's).
constexpr int kPageSize = 64;
// MLA absorbed form: 512 latent (also V) + 64 rope.
constexpr int kMlaDimLatent = 512;
constexpr int kMlaDimRope = 64;
constexpr int kMlaDimQK = kMlaDimLatent + kMlaDimRope;
// FP8 MLA cache row: 512 e4m3 + 4 fp32 scales (one per 128 values) + 64 bf16 rope = 656 bytes.
constexpr int kMlaFp8ScaleBlock = 128;
constexpr int kMlaFp8RowBytes =
    kMlaDimLatent + (kMlaDimLatent / kMlaFp8ScaleBlock) * 4 + kMlaDimRope * 2;
// e4m3 finite maximum: quantisation maps amax to this value.
constexpr float kE4m3Max = 448.0f;

// The compiled configurations. CPU and CUDA accept exactly the same set so that a model that runs
// on one runs on the other; a new head count is one entry here plus one kernel instantiation.
constexpr int kIndexerHeads[] = {32, 64};     // GLM-5: 32, DeepSeek-V3.2: 64
constexpr int kIndexerHeadDims[] = {64, 128};
constexpr int kMlaHeads[] = {16, 32, 64, 128};  // TP shards of 128
constexpr int kMaxNextN = 4;                    // MTP rows per sequence in decode
constexpr int kMaxTopk = 2048;                  // selection ops (attention takes any k >= 1)

// I[t, s] = k_scale[s] * sum_h weights[t, h] * max(0, q[t, h, :] . k[s, :]) for s in [ks[t], ke[t]),
// -inf elsewhere in the row.
struct IndexerLogitsParams {
  const uint8_t* q;        // [S, H, D] e4m3, contiguous
  const uint8_t* k;        // [N, D] e4m3, contiguous
  const float* k_scale;    // [N]
  const float* weights;    // [S, H], contiguous (q scale and H^-1/2 D^-1/2 already folded in)
  const int32_t* ks;       // [S] first visible key
  const int32_t* ke;       // [S] one past the last visible key
  float* out;              // [S, N], row stride out_row_stride >= N, unit column stride
  int64_t S;
  int64_t N;
  int H;
  int D;
  int64_t out_row_stride;
  // CUDA only: when set, the launch does nothing unless *run_if != 0 (read on the device, so a
  // stage can be skipped without a host synchronisation; indexer_topk's fallback).
  const int32_t* run_if;
};

// Paged decode form. kv_cache is DeepGEMM's layout: per page of 64 tokens, 64 rows of D e4m3
// bytes followed by 64 fp32 scales, i.e. page p starts at byte p * 64 * (D + 4).
// Output row (b, j) (row index b * next_n + j) sees positions [0, context_lens[b] - next_n + j + 1).
struct IndexerLogitsPagedParams {
  const uint8_t* q;             // [B, next_n, H, D] e4m3, contiguous
  const uint8_t* kv_cache;      // [num_pages, 64, 1, D + 4] uint8, contiguous
  const float* weights;         // [B * next_n, H], contiguous
  const int32_t* context_lens;  // [B]
  const int32_t* block_table;   // [B, max_pages_per_seq], row stride block_table_row_stride
  float* out;                   // [B * next_n, max_context_len], row stride out_row_stride
  int B;
  int next_n;
  int H;
  int D;
  int64_t num_pages;
  int max_pages_per_seq;
  int64_t block_table_row_stride;
  int max_context_len;
  int64_t out_row_stride;
};

// Top-k over row windows. Selected set: the k largest values of logits[r, start_r : end_r] under
// NaN < -inf < ... < +inf, ties to the smaller column. Output holds absolute column indices,
// -1 padded when the window has fewer than k columns.
struct TopkParams {
  const float* logits;       // [R, C], row stride logits_row_stride, unit column stride
  const int32_t* row_starts; // [R] or nullptr for 0
  const int32_t* row_ends;   // [R] or nullptr for C
  int32_t* out;              // [R, k], row stride out_row_stride
  int64_t R;
  int64_t C;
  int64_t logits_row_stride;
  int64_t out_row_stride;
  int k;
  bool sorted;               // descending value, then ascending index
  const int32_t* run_if;     // CUDA only, as IndexerLogitsParams::run_if
};

// Fused scoring + selection: the scores are IndexerLogitsParams' (its `out` is unused).
struct IndexerTopkParams {
  IndexerLogitsParams scores;
  int32_t* out;              // [S, k], row stride out_row_stride: key indices, -1 padded
  int64_t out_row_stride;
  int k;
  bool sorted;
};

struct IndexerTopkPagedParams {
  IndexerLogitsPagedParams scores;
  int32_t* out;              // [B * next_n, k]: positions, -1 padded
  int64_t out_row_stride;
  int k;
  bool sorted;
};

// out[t, h, :] = sum_j softmax_j(sm_scale * q[t, h, :] . kv[idx_j, :]) * kv[idx_j, :d_v] over the
// k indices of query t; -1 is skipped; lse is the natural log of the softmax denominator
// (of the scaled logits). A row with no valid index gives out = 0 and lse = -inf.
struct SparseMlaPrefillParams {
  const uint16_t* q;        // [S, Hq, 576] bf16, contiguous
  const uint16_t* kv;       // [N, 1, 576] bf16, contiguous
  const int32_t* indices;   // [S, topk], contiguous
  uint16_t* out;            // [S, Hq, d_v] bf16, contiguous
  float* lse;               // [S, Hq], contiguous
  int64_t S;
  int64_t N;
  int Hq;
  int topk;
  int d_v;
  float sm_scale;
  // CUDA only (the CPU path ignores both): split-k scratch of
  // cuda::sparse_mla_workspace_bytes(S, Hq, topk) bytes, allocated by the op layer; nullptr / 0
  // when that is 0 (no split).
  void* workspace;
  int64_t workspace_bytes;
};

// Decode over a paged MLA cache: bf16 rows of 576 or FP8 rows of 656 bytes
// (512 e4m3 | 4 fp32 scales | 64 bf16 rope). indices hold positions in the sequence; position p
// of batch b lives in page block_table[b, p / 64], row p % 64.
struct SparseMlaDecodeParams {
  const uint16_t* q;            // [B, next_n, Hq, 576] bf16, contiguous
  const uint8_t* kv_cache;      // [num_pages, 64, 1, row_bytes], contiguous
  bool fp8_cache;               // row_bytes = 656 if true, else 1152 (576 bf16)
  const int32_t* indices;       // [B, next_n, topk], contiguous
  const int32_t* block_table;   // [B, max_pages_per_seq], row stride block_table_row_stride
  uint16_t* out;                // [B, next_n, Hq, d_v] bf16, contiguous
  float* lse;                   // [B, next_n, Hq], contiguous
  int B;
  int next_n;
  int Hq;
  int topk;
  int d_v;
  int64_t num_pages;
  int max_pages_per_seq;
  int64_t block_table_row_stride;
  float sm_scale;
  // CUDA only, as in SparseMlaPrefillParams: cuda::sparse_mla_workspace_bytes(B * next_n, Hq, topk).
  void* workspace;
  int64_t workspace_bytes;
};

// Quantise bf16 indexer keys to e4m3 with one fp32 scale per token (amax / 448, optionally rounded
// up to a power of two) and write them into the paged indexer cache at slot_mapping[t]
// (= page * 64 + row); a negative slot skips the token.
struct IndexerKCacheInsertParams {
  const uint16_t* k;              // [T, D] bf16, contiguous
  const int64_t* slot_mapping;    // [T]
  uint8_t* kv_cache;              // [num_pages, 64, 1, D + 4], contiguous
  int64_t T;
  int D;
  int64_t num_pages;
  bool pow2_scale;
};

// Write MLA latent rows (kv_c: 512, k_pe: 64) into the paged MLA cache, bf16 rows copied as they
// are, FP8 rows quantised per 128 values (amax / 448, optionally rounded up to a power of two).
struct MlaKvCacheInsertParams {
  const uint16_t* kv_c;           // [T, 512] bf16, row stride kv_c_row_stride, unit column stride
  const uint16_t* k_pe;           // [T, 64] bf16, row stride k_pe_row_stride, unit column stride
  const int64_t* slot_mapping;    // [T]
  uint8_t* kv_cache;              // [num_pages, 64, 1, row_bytes], contiguous
  bool fp8_cache;
  int64_t T;
  int64_t kv_c_row_stride;
  int64_t k_pe_row_stride;
  int64_t num_pages;
  bool pow2_scale;
};

}  // namespace indexcache
