// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * remora_racc: replication-aware congestion control (see ../README.md).
 *
 * Two programs share one socket-local storage map:
 *  - racc_sockops (cgroup sock_ops): for established sockets that use
 *    remora_racc it asks the kernel to report segments with unknown TCP
 *    options, and stamps the socket when one carries remora's mark (RFC 6994
 *    experimental option, kind 253, ExID 0x524d "RM", put by remora's engine
 *    on the speculative ACKs it builds for the guest);
 *  - the tcp_congestion_ops callbacks: while marks keep coming, the ACKs come
 *    from a replicating VMM that owns the reliable delivery toward the real
 *    peer, so the window the VMM advertises (its replication buffer) is
 *    filled at once and nothing backs the window off; otherwise every
 *    callback is the kernel's own CUBIC (kfuncs), so a RACC socket toward a
 *    real peer is a CUBIC socket.
 */
#include "racc_kernel.h"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char _license[] SEC("license") = "Dual BSD/GPL";

#define RACC_OPT_KIND 253
#define RACC_EXID_HI 0x52
#define RACC_EXID_LO 0x4d
/* A mark older than this no longer counts (the ACK clock of a speculating
 * VMM is sub-millisecond; a real peer never marks). */
#define RACC_MARK_TTL_NS (200ULL * 1000 * 1000)
#define SOL_TCP 6
#define TCP_CONGESTION 13
#define TCP_CA_Open 0

/* The kernel's CUBIC, exported to struct_ops programs as kfuncs. */
extern void cubictcp_init(struct sock *sk) __ksym;
extern u32 cubictcp_recalc_ssthresh(struct sock *sk) __ksym;
extern void cubictcp_cong_avoid(struct sock *sk, u32 ack, u32 acked) __ksym;
extern void cubictcp_state(struct sock *sk, u8 new_state) __ksym;
extern void cubictcp_cwnd_event(struct sock *sk, enum tcp_ca_event event) __ksym;
extern void cubictcp_acked(struct sock *sk, const struct ack_sample *sample) __ksym;
extern u32 tcp_reno_undo_cwnd(struct sock *sk) __ksym;

struct racc_sk {
	/* bpf_ktime_get_ns() of the last marked segment (0: none yet). */
	__u64 mark_ns;
	/* Marked segments seen. */
	__u64 marks;
	/* Behaving as behind a VMM at the last window decision. */
	__u32 speculating;
	/* Times the socket switched from VMM behaviour back to CUBIC. */
	__u32 fallbacks;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct racc_sk);
} racc_sk_stg SEC(".maps");

/* Counters for `remora racc status`: [0] sockets initialised, [1] marked
 * segments, [2] windows filled, [3] back-offs refused, [4] fallbacks. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 5);
	__type(key, __u32);
	__type(value, __u64);
} racc_stats SEC(".maps");

static __always_inline void count(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&racc_stats, &i);
	if (v)
		*v += 1;
}

static __always_inline bool uses_racc(struct bpf_sock_ops *skops)
{
	char cc[16] = {};
	static const char me[] = "remora_racc";

	if (bpf_getsockopt(skops, SOL_TCP, TCP_CONGESTION, cc, sizeof(cc)))
		return false;
	for (int i = 0; i < (int)sizeof(me); i++)
		if (cc[i] != me[i])
			return false;
	return true;
}

SEC("sockops")
int racc_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (uses_racc(skops))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB: {
		__u8 opt[4] = { RACC_OPT_KIND, 4, RACC_EXID_HI, RACC_EXID_LO };
		struct bpf_sock *sk = skops->sk;
		struct racc_sk *s;

		if (!sk || bpf_load_hdr_opt(skops, opt, sizeof(opt), 0) < 0)
			break;
		s = bpf_sk_storage_get(&racc_sk_stg, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (s) {
			s->mark_ns = bpf_ktime_get_ns();
			s->marks++;
		}
		count(1);
		break;
	}
	}
	return 1;
}

static __always_inline struct racc_sk *state(struct sock *sk)
{
	return bpf_sk_storage_get(&racc_sk_stg, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
}

/* Are this socket's ACKs coming from a speculating VMM? */
static __always_inline bool speculated(struct sock *sk)
{
	struct racc_sk *s = state(sk);

	if (!s || !s->mark_ns)
		return false;
	return bpf_ktime_get_ns() - s->mark_ns < RACC_MARK_TTL_NS;
}

/* The window the VMM advertises, in segments (within the socket's clamp). */
static __always_inline u32 vmm_window(struct tcp_sock *tp)
{
	u32 mss = tp->mss_cache ? tp->mss_cache : 1;
	u32 w = tp->snd_wnd / mss + 1;

	if (w > tp->snd_cwnd_clamp)
		w = tp->snd_cwnd_clamp;
	return w < 2 ? 2 : w;
}

SEC("struct_ops/racc_init")
void BPF_PROG(racc_init, struct sock *sk)
{
	struct racc_sk *s = state(sk);

	if (s)
		s->speculating = 0;
	count(0);
	cubictcp_init(sk);
}

SEC("struct_ops/racc_ssthresh")
u32 BPF_PROG(racc_ssthresh, struct sock *sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	if (speculated(sk)) {
		/* Loss seen by the guest behind a VMM is the VMM's own business
		 * (it retransmits toward the peer): no back-off. */
		count(3);
		return tp->snd_cwnd > 2 ? tp->snd_cwnd : 2;
	}
	return cubictcp_recalc_ssthresh(sk);
}

SEC("struct_ops/racc_cong_avoid")
void BPF_PROG(racc_cong_avoid, struct sock *sk, u32 ack, u32 acked)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	struct racc_sk *s = state(sk);
	bool spec = speculated(sk);

	if (spec) {
		u32 w = vmm_window(tp);

		if (s)
			s->speculating = 1;
		if (tp->snd_cwnd < w) {
			tp->snd_cwnd = w;
			count(2);
		}
		if (tp->snd_ssthresh < w)
			tp->snd_ssthresh = w;
		return;
	}
	if (s && s->speculating) {
		/* The marks stopped (the VMM stopped speculating this flow, or
		 * it never was on a replicated path): restart from a modest
		 * window, as after idle, and let CUBIC probe the real path. */
		u32 half = tp->snd_cwnd / 2;

		s->speculating = 0;
		s->fallbacks++;
		count(4);
		tp->snd_ssthresh = half > 2 ? half : 2;
		if (tp->snd_cwnd > 10)
			tp->snd_cwnd = 10;
		cubictcp_cwnd_event(sk, CA_EVENT_CWND_RESTART);
	}
	cubictcp_cong_avoid(sk, ack, acked);
}

SEC("struct_ops/racc_set_state")
void BPF_PROG(racc_set_state, struct sock *sk, u8 new_state)
{
	cubictcp_state(sk, new_state);
}

SEC("struct_ops/racc_cwnd_event")
void BPF_PROG(racc_cwnd_event, struct sock *sk, enum tcp_ca_event ev)
{
	cubictcp_cwnd_event(sk, ev);
}

SEC("struct_ops/racc_pkts_acked")
void BPF_PROG(racc_pkts_acked, struct sock *sk, const struct ack_sample *sample)
{
	cubictcp_acked(sk, sample);
}

SEC("struct_ops/racc_undo_cwnd")
u32 BPF_PROG(racc_undo_cwnd, struct sock *sk)
{
	return tcp_reno_undo_cwnd(sk);
}

SEC(".struct_ops.link")
struct tcp_congestion_ops racc = {
	.init = (void *)racc_init,
	.ssthresh = (void *)racc_ssthresh,
	.cong_avoid = (void *)racc_cong_avoid,
	.set_state = (void *)racc_set_state,
	.cwnd_event = (void *)racc_cwnd_event,
	.pkts_acked = (void *)racc_pkts_acked,
	.undo_cwnd = (void *)racc_undo_cwnd,
	.name = "remora_racc",
};
