{{/*
Shared pieces of the gpu-pilot chart. Every object carries the labels `kubectl gpu install` gives
it (app.kubernetes.io/managed-by: gpu-pilot, part-of, component), so the plugin, the controller
and this chart select the same objects; Helm tracks its release through its own annotations.
Object names are fixed (gpu-pilot-controller, gpu-pilot-webhook, cluster-policy): one install
per cluster, as the single ClusterPolicy implies.
*/}}

{{/* Labels of an object; the argument is its component, e.g. (include "gpu-pilot.labels" "controller"). */}}
{{- define "gpu-pilot.labels" -}}
app.kubernetes.io/component: {{ . | quote }}
app.kubernetes.io/managed-by: gpu-pilot
app.kubernetes.io/part-of: gpu-pilot
{{- end }}

{{/* Selector of a workload; the argument is its name. */}}
{{- define "gpu-pilot.selector" -}}
app.kubernetes.io/name: {{ . | quote }}
app.kubernetes.io/part-of: gpu-pilot
{{- end }}

{{/* Labels of a workload's pods: (list name component). */}}
{{- define "gpu-pilot.podLabels" -}}
app.kubernetes.io/component: {{ index . 1 | quote }}
{{ include "gpu-pilot.selector" (index . 0) }}
{{- end }}

{{/*
An image reference from a values section with repository, image and version:
(list section .Chart). An empty version means "v" + the chart's appVersion; a sha256: version is
a digest (@), anything else a tag (:); an empty repository leaves the image name alone.
*/}}
{{- define "gpu-pilot.image" -}}
{{- $v := index . 0 -}}
{{- $chart := index . 1 -}}
{{- $version := $v.version | default (printf "v%s" $chart.AppVersion) | toString -}}
{{- $sep := ternary "@" ":" (hasPrefix "sha256:" $version) -}}
{{- if $v.repository -}}
{{- printf "%s/%s%s%s" (regexReplaceAll "/+$" $v.repository "") $v.image $sep $version -}}
{{- else -}}
{{- printf "%s%s%s" $v.image $sep $version -}}
{{- end -}}
{{- end }}

{{/* imagePullSecrets from a list of Secret names, as a flow list ([] when there are none). */}}
{{- define "gpu-pilot.pullSecrets" -}}
{{- $out := list -}}
{{- range . -}}
{{- $out = append $out (dict "name" .) -}}
{{- end -}}
{{- toJson $out -}}
{{- end }}

{{/* The restricted Pod Security profile, for the pod and for its container. */}}
{{- define "gpu-pilot.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "gpu-pilot.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
  - ALL
{{- end }}

{{/* The webhook's ServiceAccount, roles, Service, Deployment and both configurations. */}}
{{- define "gpu-pilot.webhookName" -}}
gpu-pilot-webhook
{{- end }}

{{/*
Where the apiserver sends one webhook's reviews: the in-cluster Service, or webhook.url (trailing
slashes dropped) plus the path; the argument is (list $ path).
*/}}
{{- define "gpu-pilot.webhookClientConfig" -}}
{{- $ := index . 0 -}}
{{- $path := index . 1 -}}
{{- with $.Values.webhook -}}
{{- if .url }}
url: {{ printf "%s%s" (regexReplaceAll "/+$" .url "") $path | quote }}
{{- else }}
service:
  name: {{ include "gpu-pilot.webhookName" $ }}
  namespace: {{ $.Release.Namespace | quote }}
  path: {{ $path | quote }}
  port: 443
{{- end }}
{{- if .caBundle }}
caBundle: {{ .caBundle | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The ClusterPolicy spec: the policy sections of the values, and operator.defaultRuntime,
runtimeClass, labels, annotations, initContainer and use_ocp_driver_toolkit as spec.operator
(kubectl-gpu's values::spec_json); NVIDIA's chart-only keys dropped or renamed as NVIDIA's chart
writes them, and an empty migManager.config.name read as NVIDIA's operator reads it, as the default
mig-parted ConfigMap (kubectl-gpu's nvidia::chart_keys_to_spec).
*/}}
{{- define "gpu-pilot.policySpec" -}}
{{- $operator := dict -}}
{{- range $key := list "defaultRuntime" "runtimeClass" "labels" "annotations" "initContainer" "use_ocp_driver_toolkit" -}}
{{- if hasKey $.Values.operator $key -}}
{{- $_ := set $operator $key (get $.Values.operator $key) -}}
{{- end -}}
{{- end -}}
{{- $spec := dict "operator" $operator -}}
{{- range $key := list "daemonsets" "driver" "toolkit" "devicePlugin" "dcgmExporter" "gfd" "migManager" "mig" "validator" "cdi" "hostPaths" "psa" "gds" "gdrcopy" "dcgm" "nodeStatusExporter" "psp" "sandboxWorkloads" "vfioManager" "sandboxDevicePlugin" "vgpuManager" "vgpuDeviceManager" "kataManager" "ccManager" -}}
{{- if hasKey $.Values $key -}}
{{- $_ := set $spec $key (deepCopy (get $.Values $key)) -}}
{{- end -}}
{{- end -}}
{{- range $section := list "devicePlugin" "migManager" "dcgmExporter" -}}
{{- $s := get $spec $section -}}
{{- if and (kindIs "map" $s) (hasKey $s "config") (kindIs "map" $s.config) -}}
{{- $_ := set $s "config" (omit $s.config "create" "data") -}}
{{- end -}}
{{- end -}}
{{- $mm := get $spec "migManager" -}}
{{- if and (kindIs "map" $mm) (kindIs "map" $mm.config) (hasKey $mm.config "name") (eq (toString $mm.config.name) "") -}}
{{- $_ := set $mm.config "name" "default-mig-parted-config" -}}
{{- end -}}
{{- $driver := get $spec "driver" -}}
{{- if kindIs "map" $driver -}}
{{- if hasKey $driver "nvidiaDriverCRD" -}}
{{- $crd := $driver.nvidiaDriverCRD -}}
{{- $_ := unset $driver "nvidiaDriverCRD" -}}
{{- if and (kindIs "map" $crd) (hasKey $crd "enabled") -}}
{{- $_ := set $driver "useNvidiaDriverCRD" $crd.enabled -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey $driver "upgradePolicy") (kindIs "map" $driver.upgradePolicy) -}}
{{- $up := $driver.upgradePolicy -}}
{{- if hasKey $up "gpuPodDeletion" -}}
{{- $_ := set $up "podDeletion" $up.gpuPodDeletion -}}
{{- $_ := unset $up "gpuPodDeletion" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $spec -}}
{{- end }}

{{/*
Refuse what gpu-pilot does not support: each key of files/refused.yaml (written by kubectl-gpu,
which refuses the same) that is true in the values fails the render with its message.
*/}}
{{- define "gpu-pilot.refuseUnsupported" -}}
{{- $refused := .Files.Get "files/refused.yaml" | fromYaml -}}
{{- range $key, $message := $refused -}}
{{- $v := $.Values -}}
{{- range $segment := splitList "." $key -}}
{{- if kindIs "map" $v -}}
{{- $v = get $v $segment -}}
{{- else -}}
{{- $v = false -}}
{{- end -}}
{{- end -}}
{{- if eq (toString $v) "true" -}}
{{- fail $message -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
The controller's image: NVIDIA's gpu-operator image (from NVIDIA's values) means gpu-pilot's
controller, as in kubectl-gpu's Values::controller_image.
*/}}
{{- define "gpu-pilot.controllerImage" -}}
{{- $v := index . 0 -}}
{{- $chart := index . 1 -}}
{{- $name := first (splitList ":" (last (splitList "/" (first (splitList "@" (toString $v.image)))))) -}}
{{- if eq $name "gpu-operator" -}}
{{- include "gpu-pilot.image" (list (dict "repository" "ghcr.io/gpu-pilot" "image" "gpu-pilot-controller" "version" "") $chart) -}}
{{- else -}}
{{- include "gpu-pilot.image" (list $v $chart) -}}
{{- end -}}
{{- end }}

{{/* Labels and Helm hook annotations of the uninstall hooks' ServiceAccount and roles (templates/uninstall-hook.yaml). */}}
{{- define "gpu-pilot.uninstallHookMeta" -}}
labels:
  {{- include "gpu-pilot.labels" "uninstall-hook" | nindent 2 }}
annotations:
  helm.sh/hook: pre-delete,post-delete
  helm.sh/hook-weight: "-10"
  helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
