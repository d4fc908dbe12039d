# Helpers shared by scripts/nvidia-gpu-operator and scripts/bench-rollout. They need a function
# `kc` that runs kubectl against the cluster.
#
# sa_kubeconfig NAMESPACE SERVICEACCOUNT FILE
#   writes FILE: the cluster's server and CA, and a 24-hour token of the ServiceAccount, so a
#   process run with it holds exactly that account's RBAC and an audit log can pick out its
#   requests (user system:serviceaccount:NAMESPACE:SERVICEACCOUNT).
#
# crds_established CRD...
#   waits (60 s at most) until each CustomResourceDefinition is Established. `kubectl wait
#   --for=condition=Established` right after the create can fail instead of waiting ("accessor
#   error: <nil> ... expected []interface{}") while the CRD has no conditions yet.
#
# Operand readiness, judged the same way for gpu-pilot, NVIDIA's GPU Operator and the bare
# DaemonSets of the floor:
#
# operands_ready NAMESPACE
#   prints "READY EXPECTED LAST_READY" and succeeds when READY = EXPECTED > 0:
#   EXPECTED  for every DaemonSet in NAMESPACE, the nodes its nodeSelector matches (from the Nodes,
#             not from the DaemonSet's status, whose counters lag behind new node labels)
#   READY     of those, the DaemonSet's pods that are Ready (at most one counted per node)
#   LAST_READY the latest Ready condition lastTransitionTime among them (RFC 3339, seconds), or -
crds_established() {
  local crd start=$SECONDS
  for crd in "$@"; do
    until [ "$(kc get crd "$crd" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null)" = True ]; do
      [ $((SECONDS - start)) -lt 60 ] || { echo "CRD $crd not Established after 60s" >&2; return 1; }
      sleep 0.2
    done
  done
}

operands_ready() {
  local ns=$1 expected=0 name sel n
  while read -r name sel; do
    [ -n "$name" ] || continue
    n=$(kc get nodes ${sel:+-l "${sel%,}"} -o name | wc -l)
    expected=$((expected + n))
  done < <(kc get daemonsets -n "$ns" -o go-template='{{range .items}}{{.metadata.name}} {{range $k, $v := .spec.template.spec.nodeSelector}}{{$k}}={{$v}},{{end}}{{"\n"}}{{end}}')
  # One line per pod that a DaemonSet owns: owner node ready-status transition-time.
  kc get pods -n "$ns" -o go-template='{{range .items}}{{$p := .}}{{range .metadata.ownerReferences}}{{if eq .kind "DaemonSet"}}{{.name}} {{$p.spec.nodeName}}{{range $p.status.conditions}}{{if eq .type "Ready"}} {{.status}} {{.lastTransitionTime}}{{end}}{{end}}{{"\n"}}{{end}}{{end}}{{end}}' |
    awk -v expected="$expected" '
      $3 == "True" && !seen[$1 " " $2]++ { ready++; if ($4 > last) last = $4 }
      END { printf "%d %d %s\n", ready, expected, (last == "" ? "-" : last); exit !(expected > 0 && ready >= expected) }'
}

# Seconds since the epoch (with fractions) of an RFC 3339 time.
epoch_of() { date -d "$1" +%s.%N; }

sa_kubeconfig() {
  local ns=$1 sa=$2 file=$3 server ca token
  server=$(kc config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')
  ca=$(kc config view --minify --raw --flatten -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
  token=$(kc create token "$sa" -n "$ns" --duration=24h)
  (umask 077; cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster: {server: "$server", certificate-authority-data: "$ca"}
users:
- name: $sa
  user: {token: "$token"}
contexts:
- name: $sa
  context: {cluster: cluster, user: $sa, namespace: "$ns"}
current-context: $sa
EOF
  )
}
