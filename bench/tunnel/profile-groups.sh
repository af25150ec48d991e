#!/usr/bin/env bash
# Cycles per byte by function group, from a whole-machine profile of a tunnel run:
#
#   bench/tunnel/profile-groups.sh PERF_DATA GBIT_S SECONDS [GHZ]
#
# PERF_DATA is what the anchors harness records with PROFILE="cfg/P" (perf record -a -g -F 999
# for the run's SECONDS, every CPU: both tunnel ends, both TCP stacks, iperf3, softirqs, idle);
# GBIT_S is that run's throughput. GHZ (default: /proc/cpuinfo's first "cpu MHz") turns
# CPU-clock samples into cycles: this VM has no cycle counter, so a sample is 1/F s of a core.
# Each sample goes to the first group whose rule matches its symbol (or command); the rules
# are in the awk program below, in order.
set -euo pipefail
DATA=${1:?perf.data} GBIT=${2:?Gbit/s of the run} SECS=${3:?seconds profiled}
GHZ=${4:-$(awk -F: '/^cpu MHz/ {printf "%.3f", $2 / 1000; exit}' /proc/cpuinfo)}
FREQ=$(perf evlist -i "$DATA" -F 2>/dev/null | sed -n 's/.*sample_freq=\([0-9]*\).*/\1/p' | head -1)
FREQ=${FREQ:-999}
perf report -i "$DATA" --no-children --sort comm,dso,sym --stdio -g none -n --percent-limit 0 2>/dev/null |
  awk -v gbit="$GBIT" -v secs="$SECS" -v ghz="$GHZ" -v freq="$FREQ" '
  /^#/ || NF < 5 { next }
  {
    n = $2; comm = $3; dso = $4; kind = $5
    sym = ""; for (i = 6; i <= NF; i++) sym = sym (i > 6 ? " " : "") $i
    g = group(comm, dso, kind, sym)
    s[g] += n; total += n
  }
  function group(comm, dso, kind, sym) {
    if (comm == "swapper" || sym ~ /default_idle|safe_halt|cpuidle|do_idle|acpi_idle|mwait/) return "idle"
    if (sym ~ /chacha|poly1305|ring::aead|ring_core.*(seal|open)/) return "crypto"
    if (sym ~ /checksum|csum/) return "checksums"
    if (sym ~ /_copy_to_iter|_copy_from_iter|copy_user|rep_movs|memmove|memcpy|memset|__check_object_size|__virt_addr_valid|check_heap_object|copy_page/) return "copies (kernel and user)"
    if (kind == "[.]" && sym ~ /malloc|_int_free|^free$|cfree|unlink_chunk|tcache|_int_realloc|realloc|__libc_free|sysmalloc|malloc_consolidate/) return "allocator"
    if (sym ~ /finish_task_switch|schedule|try_to_wake_up|wake_up|_raw_spin_unlock_irqrestore|pick_next|enqueue_|dequeue_|update_curr|select_task|ttwu|handle_softirqs|__do_softirq|irq_exit|irqentry|do_sys_poll|do_poll|__x64_sys_poll|__pollwait|pollwake|ep_poll|hrtimer|tick_|sched_|__switch_to|psi_|native_sched_clock|set_next_entity|put_prev/) return "scheduling and wake-ups"
    if (sym ~ /spin_lock|mutex|futex|rwsem|RwLock|Mutex|pthread_(mutex|rwlock)|lll_lock/) return "locks"
    if (sym ~ /tun_|tun_rs|virtio_net_hdr|GROTable|tcp_gro|gso_split|handle_gro/) return "tun I/O (kernel tun, tun-rs split and GRO)"
    if (sym ~ /udp|quinn|__ip_append_data|ip_make_skb|sendmsg|recvmsg|mmsg|__skb_datagram_iter|skb_copy_datagram|skb_recv|sock_|__sys_|____sys_|entry_SYSCALL|do_syscall|syscall_exit|__x64_sys/) return "UDP I/O and syscall entry"
    if (dso == "appliance" || dso ~ /boringtun|wireguard|openvpn/ || sym ~ /appliance::|boringtun::|prefix_trie|hash_one|ip_network_table/) return "engine (WireGuard state, LPM, lookups)"
    if (comm == "iperf3") return "iperf3 (user and its syscalls)"
    if (kind == "[k]") return "kernel network stack (TCP, IP, veth, skb)"
    return "other"
  }
  END {
    bytes = gbit * 1e9 / 8 * secs
    printf "%d samples at %d Hz on every CPU (%.2f CPU-s), %.2f Gbit/s for %s s (%.2f GB), %.3f GHz\n\n",
      total, freq, total / freq, gbit, secs, bytes / 1e9, ghz
    print "| group | share of samples | cycles per byte |"
    print "|---|---|---|"
    for (g in s) order[g] = s[g]
    while (1) {
      best = ""; for (g in order) if (best == "" || order[g] > order[best]) best = g
      if (best == "") break
      printf "| %s | %.1f %% | %.2f |\n", best, 100 * s[best] / total, s[best] / freq * ghz * 1e9 / bytes
      delete order[best]
    }
    printf "| **all** | 100 %% | **%.2f** |\n", total / freq * ghz * 1e9 / bytes
  }'
