# Real nodes for scripts/local-cluster (sourced by it): a kubelet, containerd, runc, the CNI
# plugins and kube-proxy per node, each node in namespaces of its own on this machine
# (scripts/lib/node-init is its first process). docs/architecture.md ("A real node") says why
# each setting is what it is.
#
# The network of one cluster, 10.K.0.0/16 with K chosen free on this machine:
#   10.K.0.1           the host's end: a bridge gpb-<id>; the apiserver and the registry listen here
#   10.K.0.(10+i)      node i's eth0 (a veth on that bridge); kubelet :10250
#   10.K.(128+i).0/24  node i's pods (bridge cni0 inside the node), routed by the host via the node
#   10.96.0.0/16       Services (kube-proxy's iptables rules, inside each node)

# Kernel settings the kubelet insists on (protectKernelDefaults); see node-init.
NODE_KERNEL_TUNABLES="vm.overcommit_memory=1 vm.panic_on_oom=0 kernel.panic=10 kernel.panic_on_oops=1 kernel.keys.root_maxkeys=1000000 kernel.keys.root_maxbytes=25000000"
REGISTRY_PORT=5000
# The image every node's containerd uses for pod sandboxes, pushed to the cluster's registry at `up`.
pause_image() { echo "$gateway:$REGISTRY_PORT/pause:$(cat "$tools/pause.version")"; }

real_node_requirements() {
  [ "$(id -u)" = 0 ] || die "--real-nodes needs root: a node is a set of namespaces, mounts, cgroups and a bridge on this machine"
  local c missing=()
  for c in unshare nsenter ip iptables runc mount pivot_root sysctl flock; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  [ ${#missing[@]} = 0 ] || die "real nodes need ${missing[*]}: apt-get install -y iptables runc iproute2 util-linux procps (see the README's set-up section)"
  grep -qw overlay /proc/filesystems || die "real nodes need overlayfs in the kernel (containerd's snapshotter and the node's root file system)"
  [ "$(stat -fc %T /sys/fs/cgroup)" = tmpfs ] || [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] \
    || die "no cgroup file system under /sys/fs/cgroup"
}

# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------
# Loads (or, with "new", chooses and records) the cluster's network: net_k, net_id, gateway.
load_network() {
  if [ -f "$dir/network" ]; then
    read -r net_k net_id < "$dir/network"
    gateway=10.$net_k.0.1
    bridge=gpb-$net_id
    return 0
  fi
  return 1
}

# Picks 10.K.0.0/16 that no address or route on this machine overlaps, creates the bridge with
# 10.K.0.1 on it (which claims it), under a lock so two clusters starting at once pick apart.
network_up() {
  mkdir -p "$state_home/gpu-pilot"
  net_id=$(printf '%s' "$dir" | sha256sum | cut -c1-6)
  bridge=gpb-$net_id
  ip link show "$bridge" >/dev/null 2>&1 && die "the bridge $bridge of a cluster in $dir already exists: run 'scripts/local-cluster down --dir $dir' first"
  exec 8> "$state_home/gpu-pilot/network.lock"
  flock 8
  local used k
  used=$( { ip -4 -o addr show; ip -4 route show table all; } | { grep -o '10\.[0-9]*\.' || true; } | sort -u)
  net_k=""
  for k in $(seq 200 254); do
    grep -qx "10\.$k\." <<<"$used" || { net_k=$k; break; }
  done
  [ -n "$net_k" ] || { flock -u 8; die "no free 10.K.0.0/16 (K 200-254) for the real nodes' network"; }
  gateway=10.$net_k.0.1
  ip link add "$bridge" type bridge
  ip addr add "$gateway/24" dev "$bridge"
  ip link set "$bridge" up
  flock -u 8
  exec 8>&-
  echo "$net_k $net_id" > "$dir/network"
}

network_down() {
  load_network || return 0
  ip link del "$bridge" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# cgroups: each node gets a cgroup of its own in every hierarchy, under this process's own, and
# becomes the root of the node's cgroup namespace.
# ---------------------------------------------------------------------------------------------
# Prints "mountpoint name options path" per hierarchy mounted under /sys/fs/cgroup, where path
# is this process's cgroup in it.
cgroup_hierarchies() {
  local mp fstype super ctrls name path o
  # mountinfo: ID PARENT DEV ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS
  while read -r mp fstype super; do
    name=${mp#/sys/fs/cgroup/}
    if [ "$fstype" = cgroup2 ]; then
      path=$(sed -n 's/^0::\(.*\)$/\1/p' /proc/self/cgroup)
      echo "$mp $name cgroup2 ${path:-/}"
    else
      ctrls=()
      for o in ${super//,/ }; do
        case $o in rw|ro|xattr|clone_children|noprefix|cpuset_v2_mode|release_agent=*) ;; *) ctrls+=("$o") ;; esac
      done
      local opts
      opts=$(IFS=,; echo "${ctrls[*]}")
      # This process's cgroup in the hierarchy with exactly these controllers.
      path=$(awk -F: -v want="$opts" '{ n = split($2, a, ","); m = split(want, b, ","); if (n != m) next;
        for (i = 1; i <= n; i++) { f = 0; for (j = 1; j <= m; j++) if (a[i] == b[j]) f = 1; if (!f) next }
        print $3; exit }' /proc/self/cgroup)
      echo "$mp $name $opts ${path:-/}"
    fi
  done < <(awk '{ for (i = 7; $i != "-"; i++); if ($(i+1) == "cgroup" || $(i+1) == "cgroup2") print $5, $(i+1), $(i+3) }' /proc/self/mountinfo \
    | grep '^/sys/fs/cgroup/')
}

node_cgroup_name() { echo "gpu-pilot-$net_id-$1"; }

# Creates node NAME's cgroups; prints the cgroup.procs files to join.
node_cgroups_create() {
  local name=$1 ndir=$2 mp h opts path cg
  : > "$ndir/cgroups"
  : > "$ndir/cgroup-dirs"
  while read -r mp h opts path; do
    cg=$mp${path%/}/$(node_cgroup_name "$name")
    mkdir -p "$cg"
    if [ "$opts" = cpuset ] || [[ ",$opts," == *,cpuset,* ]]; then
      # A new cpuset has no CPUs or memory nodes until given its parent's.
      cat "$(dirname "$cg")/cpuset.cpus" > "$cg/cpuset.cpus"
      cat "$(dirname "$cg")/cpuset.mems" > "$cg/cpuset.mems"
    fi
    echo "$h $opts" >> "$ndir/cgroups"
    echo "$cg" >> "$ndir/cgroup-dirs"
    echo "$cg/cgroup.procs"
  done < <(cgroup_hierarchies)
}

# Removes a stopped node's cgroups, the kubelet's and the containers' below them first.
node_cgroups_remove() {
  local ndir=$1 cg
  [ -f "$ndir/cgroup-dirs" ] || return 0
  while read -r cg; do
    [ -d "$cg" ] || continue
    for _ in $(seq 1 50); do
      find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$cg" ] || break
      sleep 0.1
    done
    if [ -d "$cg" ]; then say "warning: could not remove the cgroup $cg (still in use?)"; fi
  done < "$ndir/cgroup-dirs"
}

# ---------------------------------------------------------------------------------------------
# Certificates and configuration of one node
# ---------------------------------------------------------------------------------------------
node_ip() { echo "10.$net_k.0.$((10 + $1))"; }
pod_cidr() { echo "10.$net_k.$((128 + $1)).0/24"; }

real_node_pki() {
  # kube-proxy's client certificate (bound to system:node-proxier by the default RBAC), and the
  # apiserver's for calling kubelets (logs, exec, port-forward).
  new_cert kube-proxy ca "/CN=system:kube-proxy" "clientAuth"
  new_cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" "clientAuth"
}

node_pki() { # name index
  local name=$1 i=$2
  new_cert "node-$name" ca "/O=system:nodes/CN=system:node:$name" "clientAuth"
  new_cert "node-$name-serving" ca "/CN=$name" "serverAuth" "IP:$(node_ip "$i"),DNS:$name"
}

# write_node_kubeconfig FILE CERT-NAME
write_node_kubeconfig() {
  local file=$1 user=$2
  mkdir -p "$(dirname "$file")"
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: gpu-pilot-local
  cluster:
    server: https://$gateway:$apiserver_port
    certificate-authority: $pki/ca.crt
users:
- name: $user
  user:
    client-certificate: $pki/$user.crt
    client-key: $pki/$user.key
contexts:
- name: gpu-pilot-local
  context:
    cluster: gpu-pilot-local
    user: $user
current-context: gpu-pilot-local
EOF
}

node_config() { # name index
  local name=$1 i=$2 ndir=$dir/nodes/$1 ip cidr
  ip=$(node_ip "$i")
  cidr=$(pod_cidr "$i")
  local etc=$ndir/etc
  mkdir -p "$etc/containerd/certs.d/$gateway:$REGISTRY_PORT" "$etc/cni/net.d" "$etc/kubernetes"
  cat > "$ndir/node.env" <<EOF
NODE_NAME=$name
NODE_IP=$ip
NODE_LABELS=$(node_labels "$i")
CLUSTER_DIR=$dir
TOOLS=$tools
KERNEL_TUNABLES="$NODE_KERNEL_TUNABLES"
EOF
  # containerd 2: CRI with runc (Debian's) under cgroupfs, the cluster's registry over plain HTTP
  # (it listens on the bridge only), the pause image built here, CNI plugins from the tools dir.
  cat > "$etc/containerd/config.toml" <<EOF
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$(pause_image)"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "/etc/containerd/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  # This machine withholds CAP_SYS_RESOURCE (not in the bounding set), so no process may lower
  # its OOM score below 0, and runc fails on the -998 the kubelet asks for sandboxes: keep each
  # container's score at least containerd's own, as rootless setups do.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$tools/cni"]
    conf_dir = "/etc/cni/net.d"
EOF
  cat > "$etc/containerd/certs.d/$gateway:$REGISTRY_PORT/hosts.toml" <<EOF
server = "http://$gateway:$REGISTRY_PORT"

[host."http://$gateway:$REGISTRY_PORT"]
  capabilities = ["pull", "resolve"]
EOF
  cat > "$etc/cni/net.d/10-gpu-pilot.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "gpu-pilot",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$cidr" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  write_node_kubeconfig "$etc/kubernetes/kubelet.kubeconfig" "node-$name"
  write_node_kubeconfig "$etc/kubernetes/kube-proxy.kubeconfig" kube-proxy
  cat > "$etc/kubernetes/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 (hybrid); kubelet 1.35+ refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
# The root of the node's cgroup namespace is the node's own cgroup on the host.
cgroupRoot: /
cgroupsPerQOS: true
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $pki/node-$name-serving.crt
tlsPrivateKeyFile: $pki/node-$name-serving.key
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $pki/ca.crt
authorization:
  mode: Webhook
protectKernelDefaults: true
# Negative OOM scores need CAP_SYS_RESOURCE, which this machine withholds (see containerd's).
oomScoreAdj: 0
failSwapOn: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# The disk is shared with everything else on this machine: do not evict pods for it.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
maxPods: 110
EOF
  cat > "$etc/kubernetes/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: /etc/kubernetes/kube-proxy.kubeconfig
hostnameOverride: $name
mode: iptables
clusterCIDR: 10.$net_k.128.0/17
bindAddress: $ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
# Connection-tracking limits are global to the machine: leave them as they are.
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

# The labels a real node registers with (the kubelet may set these: none is in kubernetes.io/).
real_node_inventory=a100-40gb
node_labels() {
  echo "feature.node.kubernetes.io/pci-10de.present=true,gpupilot.io/simulated-inventory=$real_node_inventory,gpupilot.io/real-node=true"
}

# ---------------------------------------------------------------------------------------------
# Start and stop
# ---------------------------------------------------------------------------------------------
node_init_pid() { # name: the host PID of the node's first process (PID 1 inside)
  local p
  p=$(cat "$pids/node-$1.pid" 2>/dev/null) || return 1
  p=$(cat "/proc/$p/task/$p/children" 2>/dev/null | awk '{print $1}')
  [ -n "$p" ] && echo "$p"
}

node_start() { # name index
  local name=$1 i=$2 ndir=$dir/nodes/$1 procs=()
  mkdir -p "$ndir"
  node_pki "$name" "$i"
  node_config "$name" "$i"
  mapfile -t procs < <(node_cgroups_create "$name" "$ndir")
  (
    for f in "${procs[@]}"; do echo "$BASHPID" > "$f"; done
    exec setsid unshare --pid --fork --kill-child --mount --net --uts --ipc --cgroup \
      --propagation private "$root/scripts/lib/node-init" "$ndir"
  ) > "$logs/node-$name.log" 2>&1 < /dev/null &
  echo $! > "$pids/node-$name.pid"
  local init=""
  for _ in $(seq 1 100); do
    init=$(node_init_pid "$name") && break
    sleep 0.05
  done
  [ -n "$init" ] || { show_log_tail "node-$name"; die "node $name did not start"; }
  echo "$init" > "$ndir/init.pid"
  # Its network: a veth pair, the host's end on the bridge, the node's end as its eth0.
  local veth=gpv-$net_id-$i ip
  ip=$(node_ip "$i")
  ip link add "$veth" type veth peer name eth0 netns "$init"
  ip link set "$veth" master "$bridge" up
  nsenter -t "$init" -n sh -c "ip link set lo up && ip addr add $ip/24 dev eth0 && ip link set eth0 up && ip route add default via $gateway"
  ip route add "$(pod_cidr "$i")" via "$ip" dev "$bridge"
  touch "$ndir/network-ready"
}

# Each node routes the other nodes' pods through them (one L2 segment: the bridge).
nodes_route_each_other() {
  local n=$1 a b
  for ((a = 1; a <= n; a++)); do
    for ((b = 1; b <= n; b++)); do
      [ $a = $b ] && continue
      nsenter -t "$(cat "$dir/nodes/$(real_node_name $a)/init.pid")" -n \
        ip route replace "$(pod_cidr $b)" via "$(node_ip $b)"
    done
  done
}

real_node_name() { printf 'real-node-%d' "$1"; }

# After stop_all: the nodes' processes are gone; remove their cgroups and the bridge.
real_nodes_cleanup() {
  local ndir p
  for ndir in "$dir"/nodes/*/; do
    [ -d "$ndir" ] || continue
    p=$(cat "$ndir/init.pid" 2>/dev/null || true)
    if [ -n "$p" ]; then
      kill -KILL "$p" 2>/dev/null || true
      for _ in $(seq 1 100); do running "$p" || break; sleep 0.1; done
    fi
    node_cgroups_remove "$ndir"
  done
  network_down
}

registry_start() {
  mkdir -p "$dir/registry"
  start registry crane registry serve --address "$gateway:$REGISTRY_PORT" --disk "$dir/registry"
  wait_for "the registry on $gateway:$REGISTRY_PORT" 30 registry curl -sf "http://$gateway:$REGISTRY_PORT/v2/"
  "$root/scripts/images" pause --out "$dir/images" --push "$gateway:$REGISTRY_PORT" > /dev/null
}

real_nodes_up() { # count
  local n=$1 i total
  total=$(($(kc get nodes -o name | wc -l) + n))
  for ((i = 1; i <= n; i++)); do node_start "$(real_node_name $i)" "$i"; done
  if [ "$n" -gt 1 ]; then nodes_route_each_other "$n"; fi
  local start=$SECONDS
  until nodes_ready "$total" 2>/dev/null; do
    for ((i = 1; i <= n; i++)); do
      running "$(cat "$dir/nodes/$(real_node_name $i)/init.pid")" || { show_node_logs "$(real_node_name $i)"; die "real node $(real_node_name $i) stopped; its logs are above"; }
    done
    if [ $((SECONDS - start)) -ge "${GPU_PILOT_NODE_TIMEOUT:-180}" ]; then
      for ((i = 1; i <= n; i++)); do show_node_logs "$(real_node_name $i)"; done
      die "timed out after 180s waiting for $n real nodes to be Ready; their logs are above"
    fi
    sleep 0.5
  done
  [ $verbose = 1 ] && say "$n real nodes Ready after $((SECONDS - start))s" || true
}

show_node_logs() { # name
  local f
  for f in "$logs/node-$1.log" "$dir/nodes/$1"/fs/var/log/gpu-pilot/*.log; do
    [ -f "$f" ] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 15 "$f" >&2
  done
}

# node_exec NAME COMMAND...: runs COMMAND inside node NAME (all its namespaces).
node_exec() {
  local name=$1; shift
  local init
  init=$(cat "$dir/nodes/$name/init.pid" 2>/dev/null) || die "no real node '$name' in $dir"
  running "$init" || die "real node '$name' is not running"
  exec nsenter -t "$init" -m -n -p -u -i -C -r -w -- env PATH="$tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "$@"
}
