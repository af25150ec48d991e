#!/usr/bin/env bash
# The node image running the site's job, measured (TCG: figures for ratios and breakdowns, not
# speeds):
#
#   sudo bench/workload/run.sh            # ROUNDS=1
#
# Runs the boot suite's workload test (tests/image_boot.rs,
# the_node_image_runs_the_sites_job_from_a_pinned_image_on_its_kernel_nfs_mount): the image
# booted as node c1 under qemu -accel tcg (1 vCPU, 1 GiB), attached by a tap device to the
# two-gateway namespace lab with bird, a docker-registry and nfs-ganesha on the site LAN.
# What it prints, per round:
#   power-on to job : guest uptime at each step of the console (kernel + stage 1, config,
#                     tunnels, pull + verify + unpack, NFS mounts, start)
#   NFS from the VM : 32 MiB written with fsync through the kernel client, nconnect = links (2)
#                     against nconnect 1, each to its own server address (its own NFS client)
#   spread          : bytes each (gateway, link) carried for the 64 MiB the job wrote (nconnect 8)
# The anchor for the NFS figure is the same mount with nconnect 1 in the same run.
# Needs what tests/run.sh installs. Traffic stays inside the test's namespaces.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-1}
for r in $(seq 1 "$rounds"); do
  echo "== round $r"
  cargo test --quiet --test image_boot the_node_image_runs -- --nocapture 2>&1 \
    | grep -E "^workload VM:" | sed -e 's/\[ *[0-9.]*\] appliance-init: workload| //'
done
