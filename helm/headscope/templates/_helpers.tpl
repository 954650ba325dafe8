{{/*
Names and labels.
*/}}
{{- define "headscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
The RayService's name. KubeRay derives <name>-head-svc and <name>-serve-svc from it, so it is
kept short enough for those Service names to stay valid DNS labels.
*/}}
{{- define "headscope.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "headscope.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "headscope.fullname" .) -}}
{{- end -}}

{{- define "headscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "headscope.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "headscope.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "headscope.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
The Serve config: serve/<serveConfig>.yaml, byte for byte.
*/}}
{{- define "headscope.serveConfigText" -}}
{{- $path := printf "serve/%s.yaml" .Values.serveConfig -}}
{{- $text := .Files.Get $path -}}
{{- if not $text -}}
{{- fail (printf "serveConfig %q: the chart has no %s" .Values.serveConfig $path) -}}
{{- end -}}
{{- $text -}}
{{- end -}}

{{/*
What the chart reads from the Serve config, as YAML: the HTTP port, and the dataset_root,
auth_token_env and models of the first application with import_path service.app:build (the
one headscope's read_serve_file picks). Fails when the file does not fit the chart.
*/}}
{{- define "headscope.serveFacts" -}}
{{- $config := include "headscope.serveConfigText" . | fromYaml -}}
{{- if hasKey $config "Error" -}}
{{- fail (printf "serve/%s.yaml is not valid YAML: %s" .Values.serveConfig $config.Error) -}}
{{- end -}}
{{- $args := dict -}}
{{- $found := false -}}
{{- range ($config.applications | default list) -}}
{{- if and (not $found) (hasPrefix "service.app" (toString .import_path)) -}}
{{- $found = true -}}
{{- $args = .args | default dict -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "serve/%s.yaml: no application with import_path service.app:build" .Values.serveConfig) -}}
{{- end -}}
{{- $root := $args.dataset_root | default "" | toString -}}
{{- if not (hasPrefix "/" $root) -}}
{{- fail (printf "serve/%s.yaml: dataset_root must be an absolute path (the chart mounts its volume there), got %q" .Values.serveConfig $root) -}}
{{- end -}}
{{- $gpus := 0.0 -}}
{{- range ($args.models | default list) -}}
{{- $gpus = addf $gpus (.num_gpus | default 0 | float64) -}}
{{- end -}}
{{- $http := $config.http_options | default dict -}}
port: {{ $http.port | default 8000 | int }}
datasetRoot: {{ $root | quote }}
tokenEnv: {{ $args.auth_token_env | default "HEADSCOPE_API_TOKEN" | quote }}
needsGpus: {{ gt $gpus 0.0 }}
{{- end -}}

{{/*
Values that the schema cannot check on its own.
*/}}
{{- define "headscope.checkValues" -}}
{{- $facts := include "headscope.serveFacts" . | fromYaml -}}
{{- range $group := list "cpuWorkers" "gpuWorkers" -}}
{{- $spec := index $.Values $group -}}
{{- if and $spec.enabled (not (and (le (int $spec.minReplicas) (int $spec.replicas)) (le (int $spec.replicas) (int $spec.maxReplicas)))) -}}
{{- fail (printf "%s: needs minReplicas <= replicas <= maxReplicas (got %v, %v, %v)" $group $spec.minReplicas $spec.replicas $spec.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- if and $facts.needsGpus (not .Values.gpuWorkers.enabled) -}}
{{- fail (printf "serveConfig %s asks for GPUs: set gpuWorkers.enabled=true (see values-gpu.yaml)" .Values.serveConfig) -}}
{{- end -}}
{{- if not (or .Values.cpuWorkers.enabled .Values.gpuWorkers.enabled .Values.head.runWorkloads) -}}
{{- fail "no pod can run Serve replicas: enable cpuWorkers or gpuWorkers, or set head.runWorkloads=true" -}}
{{- end -}}
{{- if and .Values.auth.existingSecret .Values.auth.token -}}
{{- fail "auth: set existingSecret or token, not both" -}}
{{- end -}}
{{- end -}}

{{/*
The Secret holding the API token, or nothing when auth is off.
*/}}
{{- define "headscope.authSecretName" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if .Values.auth.token -}}
{{- printf "%s-auth" (include "headscope.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "headscope.authSecretKey" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecretKey -}}
{{- else -}}
token
{{- end -}}
{{- end -}}

{{/*
A Ray pod template. Arguments: root (the chart context), component (head or worker),
group (the values of the group), gpus (0 for none).
*/}}
{{- define "headscope.podTemplate" -}}
{{- $root := .root -}}
{{- $facts := include "headscope.serveFacts" $root | fromYaml -}}
{{- $secret := include "headscope.authSecretName" $root -}}
{{- $resources := deepCopy (.group.resources | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($resources.limits | default dict)) -}}
{{- end -}}
metadata:
  labels:
    {{- include "headscope.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .component }}
      image: {{ include "headscope.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy | default "IfNotPresent" }}
      ports:
        {{- if eq .component "head" }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        - name: serve
          containerPort: {{ $facts.port }}
      {{- if $secret }}
      env:
        - name: {{ $facts.tokenEnv }}
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ include "headscope.authSecretKey" $root }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: headscope-data
          mountPath: {{ $facts.datasetRoot }}
  volumes:
    - name: headscope-data
      {{- if $root.Values.storage.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ $root.Values.storage.existingClaim }}
      {{- else if $root.Values.storage.sizeLimit }}
      emptyDir:
        sizeLimit: {{ $root.Values.storage.sizeLimit }}
      {{- else }}
      emptyDir: {}
      {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
