# Sourced by the anchors harness (TUN_IMPL_FILE): appliance with a fixed worker count, for the
# 1-vs-2-workers measurement. The site end (A) gets 1 or 2 workers, the cloud end (B) stays
# at 1, so the difference is one end's queues alone.
#   CONFIGS="w1:1 w2:1"   one link: A with 1 queue vs 2 queues, B with 1
impl_w1_up() {
  WORKERS_A=1 WORKERS_B=1 NS_A=$NS_A NS_B=$NS_B UNDER_A=$UNDER_A UNDER_B=$UNDER_B PORT_BASE=53820 \
    WORK=$WORKC CGTUN=$CGROOT/tun "$TUN_IMPL_CMD" up "$1" 2> "$WORKC/ext-up.log"
}
impl_w2_up() {
  WORKERS_A=2 WORKERS_B=1 NS_A=$NS_A NS_B=$NS_B UNDER_A=$UNDER_A UNDER_B=$UNDER_B PORT_BASE=53820 \
    WORK=$WORKC CGTUN=$CGROOT/tun "$TUN_IMPL_CMD" up "$1" 2> "$WORKC/ext-up.log"
}
# b0:N: a second appliance binary (APPLIANCE_BEFORE=path) with the production worker count, for
# a before/after comparison of a change in the same run.
#   APPLIANCE_BEFORE=/tmp/ap-before CONFIGS="ext:4 b0:4"
impl_b0_up() {
  APPLIANCE_BIN=${APPLIANCE_BEFORE:?set APPLIANCE_BEFORE to the binary to compare against} \
    NS_A=$NS_A NS_B=$NS_B UNDER_A=$UNDER_A UNDER_B=$UNDER_B PORT_BASE=53820 \
    WORK=$WORKC CGTUN=$CGROOT/tun "$TUN_IMPL_CMD" up "$1" 2> "$WORKC/ext-up.log"
}
