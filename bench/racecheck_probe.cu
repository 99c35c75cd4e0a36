// What compute-sanitizer racecheck takes as ordering between warpgroups. The sparse MLA kernel
// (csrc/sparse_mla/sparse_mla_sm90.cuh) hands values between its math warpgroups with named
// barriers and between them and its producer with mbarriers; racecheck reported its correct
// handoffs as races until they were arranged the way these cases show the tool needs.
//
// One CTA of 384 threads (WG0, WG1, and WG2 in the producer's place). Each case hands 16 bytes
// per thread between two warpgroups through shared memory, after an optional prelude of
// synchronisation, and checks on the host that the value arrived (every case is correct on the
// hardware). bench/racecheck_probe.sh runs each case under racecheck and compares the verdict
// with `expect_race`.
//
// Seen (H200, compute-sanitizer 2025.3.1; this script, 2026-12-04): racecheck orders two
// threads' accesses across named barriers by how many bar.syncs each thread has passed, not by
// which barrier generation they met in: the reader must have passed more bar.syncs than the
// writer had when it wrote. bar.arrive does not count, nor does an mbarrier wait; mbarrier
// handoffs are ordered whatever the counts. A barrier over every thread of the CTA
// (__syncthreads(), or a named barrier with all 384) orders the accesses on either side of it,
// but does not put the counts back in step: a later named-barrier handoff between warpgroups
// whose counts differed is still reported (case 6). (Earlier one-by-one runs of an uncommitted
// version, 2026-12-03, had read cases 6 and 8 the other way round; this script's run is the one
// recorded here.)
//
//   nvcc -arch=sm_90a -O2 -o /tmp/racecheck_probe bench/racecheck_probe.cu
//   compute-sanitizer --tool racecheck /tmp/racecheck_probe <case>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>

namespace {

__device__ __forceinline__ void bar_sync(uint32_t id, uint32_t n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t id, uint32_t n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
               : "memory");
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// How the two math warpgroups synchronise before the handoff.
enum class Prelude {
  kNone,
  kUnequal,    // the decode schedule's old handoffs: WG0 passes 3 bar.syncs, WG1 4
  kEqual,      // the same, plus WG0's fourth: 4 each
  kMbarWaits,  // WG0 passes 3 mbarrier waits
};
// How the written value reaches the reader.
enum class Handoff {
  kNothing,
  kBarSync,          // bar.sync 6, 256 on both sides
  kBarSyncTwice,     // two of them
  kArriveSync,       // writer bar.arrive 6, 256; reader bar.sync
  kMbarrier,         // writer mbarrier.arrive; reader waits
  kSyncthreads,      // __syncthreads()
  kBarSyncAll,       // bar.sync 9, 384 (every thread, but a named barrier)
  kArriveThenMbar,   // WG0 -> WG1 by arrive/sync, WG1 reads, then WG1 -> producer by mbarrier,
                     // which overwrites by cp.async (the prefill P tile's path)
};

struct Case {
  const char* name;
  Prelude prelude;
  int wg1_local_syncs;  // then WG1 alone passes this many bar.syncs of a 128-thread barrier
  bool realign;         // then __syncthreads()
  int writer, reader;
  Handoff handoff;
  bool expect_race;  // what racecheck reports (every case but the control is race free)
};

// The unequal prelude leaves WG0 at 3 bar.syncs and WG1 at 4 (the writer is WG1 unless noted).
constexpr Case kCases[] = {
    {"control: no ordering", Prelude::kNone, 0, false, 1, 0, Handoff::kNothing, true},
    {"bar.sync both sides", Prelude::kNone, 0, false, 1, 0, Handoff::kBarSync, false},
    {"bar.arrive -> bar.sync (WG0 writes)", Prelude::kNone, 0, false, 0, 1, Handoff::kArriveSync,
     false},
    {"unequal prelude, bar.sync", Prelude::kUnequal, 0, false, 1, 0, Handoff::kBarSync, true},
    {"unequal prelude, bar.arrive -> bar.sync", Prelude::kUnequal, 0, false, 1, 0,
     Handoff::kArriveSync, true},
    {"equal prelude, bar.sync", Prelude::kEqual, 0, false, 1, 0, Handoff::kBarSync, false},
    {"unequal prelude, __syncthreads, bar.sync", Prelude::kUnequal, 0, true, 1, 0,
     Handoff::kBarSync, true},
    {"unequal prelude, __syncthreads as the handoff", Prelude::kUnequal, 0, false, 1, 0,
     Handoff::kSyncthreads, false},
    {"unequal prelude, bar.sync 9, 384", Prelude::kUnequal, 0, false, 1, 0, Handoff::kBarSyncAll,
     false},
    {"unequal prelude, mbarrier", Prelude::kUnequal, 0, false, 1, 0, Handoff::kMbarrier, false},
    {"3 WG-local bar.syncs in the writer, bar.sync", Prelude::kNone, 3, false, 1, 0,
     Handoff::kBarSync, true},
    {"3 WG-local bar.syncs in the reader, bar.sync", Prelude::kNone, 3, false, 0, 1,
     Handoff::kBarSync, false},
    {"1 WG-local bar.sync in the writer, 2 bar.syncs", Prelude::kNone, 1, false, 1, 0,
     Handoff::kBarSyncTwice, false},
    {"3 mbarrier waits in the reader, bar.sync", Prelude::kMbarWaits, 0, false, 1, 0,
     Handoff::kBarSync, false},
    {"arrive -> sync, read, mbarrier -> cp.async over it", Prelude::kNone, 0, false, 0, 1,
     Handoff::kArriveThenMbar, false},
};
constexpr int kNumCases = sizeof(kCases) / sizeof(kCases[0]);

__global__ void probe(Case c, const int4* zeros, int4* out) {
  __shared__ int4 x[128];
  __shared__ uint64_t mbar[2];
  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
  if (tid == 0) {
    mbar_init(&mbar[0], 128);
    mbar_init(&mbar[1], 128);
  }
  __syncthreads();

  switch (c.prelude) {
    case Prelude::kNone:
      break;
    case Prelude::kUnequal:
    case Prelude::kEqual:
      // WG0 -> WG1 by bar.arrive 1 / bar.sync 1, WG1 -> WG0 by bar.arrive 2 / bar.sync 2,
      // four rounds; the last WG1 -> WG0 handoff only in kEqual.
      for (int k = 0; k < 4; ++k) {
        if (wg == 0) {
          if (k > 0) bar_sync(2, 256);
          bar_arrive(1, 256);
        }
        if (wg == 1) {
          bar_sync(1, 256);
          if (k < 3) bar_arrive(2, 256);
        }
      }
      if (c.prelude == Prelude::kEqual) {
        if (wg == 0) bar_sync(2, 256);
        if (wg == 1) bar_arrive(2, 256);
      }
      break;
    case Prelude::kMbarWaits:
      if (wg == 1) mbar_arrive(&mbar[1]);
      if (wg == 0) {
        for (int k = 0; k < 3; ++k) mbar_wait(&mbar[1], 0);
      }
      break;
  }
  if (wg == 1) {
    for (int k = 0; k < c.wg1_local_syncs; ++k) bar_sync(7, 128);
  }
  if (c.realign) __syncthreads();

  const int4 mine = make_int4(tid, 1, 2, 3);
  int4 got = make_int4(-1, -1, -1, -1);
  const bool writer = wg == c.writer, reader = wg == c.reader, math = wg < 2;
  switch (c.handoff) {
    case Handoff::kNothing:
      if (writer) x[t] = mine;
      if (reader) got = x[t];
      break;
    case Handoff::kBarSync:
    case Handoff::kBarSyncTwice:
      if (writer) x[t] = mine;
      if (math) bar_sync(6, 256);
      if (math && c.handoff == Handoff::kBarSyncTwice) bar_sync(6, 256);
      if (reader) got = x[t];
      break;
    case Handoff::kArriveSync:
    case Handoff::kArriveThenMbar: {
      const bool then_mbar = c.handoff == Handoff::kArriveThenMbar;
      if (writer) {
        x[t] = mine;
        bar_arrive(6, 256);
      }
      if (reader) {
        bar_sync(6, 256);
        got = x[t];
        if (then_mbar) mbar_arrive(&mbar[0]);
      }
      if (wg == 2 && then_mbar) {
        mbar_wait(&mbar[0], 0);
        cp_async_16(&x[t], zeros + t);
      }
      break;
    }
    case Handoff::kMbarrier:
      if (writer) {
        x[t] = mine;
        mbar_arrive(&mbar[0]);
      }
      if (reader) {
        mbar_wait(&mbar[0], 0);
        got = x[t];
      }
      break;
    case Handoff::kSyncthreads:
      if (writer) x[t] = mine;
      __syncthreads();
      if (reader) got = x[t];
      break;
    case Handoff::kBarSyncAll:
      if (writer) x[t] = mine;
      bar_sync(9, 384);
      if (reader) got = x[t];
      break;
  }
  if (reader) out[t] = got;
}

}  // namespace

int main(int argc, char** argv) {
  const bool list = argc == 2 && strcmp(argv[1], "list") == 0;
  if (argc != 2 || (!list && (atoi(argv[1]) < 0 || atoi(argv[1]) >= kNumCases))) {
    fprintf(stderr, "usage: %s list | <case 0..%d>\n", argv[0], kNumCases - 1);
    return 2;
  }
  if (list) {
    for (int i = 0; i < kNumCases; ++i) {
      printf("%d\t%s\t%s\n", i, kCases[i].expect_race ? "race" : "clean", kCases[i].name);
    }
    return 0;
  }
  const Case c = kCases[atoi(argv[1])];
  int4 *zeros, *out;
  cudaMalloc(&zeros, 128 * sizeof(int4));
  cudaMalloc(&out, 128 * sizeof(int4));
  cudaMemset(zeros, 0, 128 * sizeof(int4));
  probe<<<1, 384>>>(c, zeros, out);
  int4 host[128];
  cudaMemcpy(host, out, sizeof(host), cudaMemcpyDeviceToHost);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    printf("%s: %s\n", c.name, cudaGetErrorString(err));
    return 1;
  }
  int wrong = 0;
  for (int t = 0; t < 128 && c.handoff != Handoff::kNothing; ++t) {
    wrong += host[t].x != 128 * c.writer + t;
  }
  printf("%s: %s\n", c.name,
         c.handoff == Handoff::kNothing ? "not checked" : wrong ? "WRONG VALUE" : "value arrived");
  return wrong ? 1 : 0;
}
