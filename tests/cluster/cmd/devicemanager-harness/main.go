// devicemanager-harness runs the kubelet's own device manager (k8s.io/kubernetes
// pkg/kubelet/cm/devicemanager) on a socket in a directory of the caller's choosing, so that
// gpu-pilot's tests talk to the real kubelet code instead of an imitation of it.
//
// With --pod-resources <socket> it also serves the kubelet's pod-resources API v1 (k8s.io/kubernetes
// pkg/kubelet/apis/podresources, NewV1PodResourcesServer) on that unix socket, with the device
// manager as the devices provider and the harness's admitted pods as the pods provider, as the
// kubelet does; CPU, memory and dynamic resources are reported empty.
//
// It reads one command per line on stdin and answers each with one JSON object on stdout:
//
//	devices                           what the manager knows: capacity, allocatable, healthy device IDs
//	wait <resource> <healthy> <total> <timeout_ms>
//	                                  block until the resource shows those counts (or time out)
//	allocate <[namespace/]pod> <resource> <n> [container]
//	                                  admit a container (default namespace "default", container
//	                                  "main") asking for n devices, the kubelet's way:
//	                                  GetPreferredAllocation, Allocate, then the run options
//	free <[namespace/]pod>            the pod is gone; its devices return to the pool
//	restart                           stop the registration server and start a new manager on the
//	                                  same path, as a kubelet restart does (kubelet.sock re-created)
//	bench <resource> <n> <iterations> time Allocate through the manager, report percentiles and
//	                                  the kubelet's own allocation-duration histogram
//	quit
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	_ "unsafe" // for go:linkname

	cadvisorapi "github.com/google/cadvisor/lib/model"
	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	criutil "k8s.io/cri-client/pkg/util"
	"k8s.io/klog/v2"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
	apisgrpc "k8s.io/kubernetes/pkg/kubelet/apis/grpc"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
	kubeletmetrics "k8s.io/kubernetes/pkg/kubelet/metrics"
)

// The exported constructor always listens on /var/lib/kubelet/device-plugins/kubelet.sock; the
// unexported one takes the path, which lets a test run without root and without touching a node.
//
//go:linkname newManagerImpl k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.newManagerImpl
func newManagerImpl(logger klog.Logger, socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*devicemanager.ManagerImpl, error)

type sourcesReady struct{}

func (sourcesReady) AddSource(string) {}
func (sourcesReady) AllReady() bool   { return true }

type harness struct {
	logger klog.Logger
	socket string
	mu     sync.Mutex
	pods   map[string]*v1.Pod // by namespace/name
	// The manager is replaced by `restart` while the pod-resources server may be reading it.
	mgr atomic.Pointer[devicemanager.ManagerImpl]
}

func (h *harness) m() *devicemanager.ManagerImpl { return h.mgr.Load() }

func (h *harness) activePods() []*v1.Pod {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*v1.Pod, 0, len(h.pods))
	for _, p := range h.pods {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name })
	return out
}

// The pod-resources server's providers, fed the way the kubelet feeds them: pods from the pods
// the harness admitted, devices from the device manager (the conversion is the one
// pkg/kubelet/cm does in containerDevicesFromResourceDeviceInstances, which is unexported there).
type podsProvider struct{ h *harness }

func (p podsProvider) GetActivePods() []*v1.Pod { return p.h.activePods() }
func (p podsProvider) GetPods() []*v1.Pod       { return p.h.activePods() }
func (p podsProvider) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	p.h.mu.Lock()
	defer p.h.mu.Unlock()
	pod, ok := p.h.pods[namespace+"/"+name]
	return pod, ok
}

type devicesProvider struct{ h *harness }

func (d devicesProvider) UpdateAllocatedDevices(logger klog.Logger) {
	d.h.m().UpdateAllocatedDevices(logger)
}
func (d devicesProvider) GetDevices(podUID, containerName string) []*podresourcesapi.ContainerDevices {
	return containerDevices(d.h.m().GetDevices(podUID, containerName))
}
func (d devicesProvider) GetAllocatableDevices(logger klog.Logger) []*podresourcesapi.ContainerDevices {
	return containerDevices(d.h.m().GetAllocatableDevices(logger))
}

func containerDevices(devs devicemanager.ResourceDeviceInstances) []*podresourcesapi.ContainerDevices {
	var out []*podresourcesapi.ContainerDevices
	for res, byID := range devs {
		for id, dev := range byID {
			topo := dev.GetTopology()
			if topo == nil {
				out = append(out, &podresourcesapi.ContainerDevices{ResourceName: res, DeviceIds: []string{id}})
				continue
			}
			for _, n := range topo.GetNodes() {
				out = append(out, &podresourcesapi.ContainerDevices{
					ResourceName: res,
					DeviceIds:    []string{id},
					Topology:     &podresourcesapi.TopologyInfo{Nodes: []*podresourcesapi.NUMANode{{ID: n.GetID()}}},
				})
			}
		}
	}
	return out
}

// No CPU, memory or DRA managers run here: they report nothing, as the kubelet's do for a
// container without exclusive CPUs, pinned memory or claims.
type noOtherResources struct{}

func (noOtherResources) GetCPUs(*v1.Pod, *v1.Container) []int64 { return []int64{} }
func (noOtherResources) GetPodCPUs(string) []int64              { return []int64{} }
func (noOtherResources) GetAllocatableCPUs() []int64            { return []int64{} }
func (noOtherResources) GetMemory(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.ContainerMemory {
	return nil
}
func (noOtherResources) GetPodMemory(klog.Logger, string) []*podresourcesapi.ContainerMemory {
	return nil
}
func (noOtherResources) GetAllocatableMemory(klog.Logger) []*podresourcesapi.ContainerMemory {
	return nil
}
func (noOtherResources) GetDynamicResources(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.DynamicResource {
	return nil
}

// servePodResources listens on the socket the way the kubelet's ListenAndServePodResources does
// (same rate limiter, same v1 server), without the kubelet's os.Exit on errors.
func (h *harness) servePodResources(socket string) error {
	ctx := klog.NewContext(context.Background(), h.logger)
	server := grpc.NewServer(apisgrpc.WithRateLimiter(ctx, "podresources", podresources.DefaultQPS, podresources.DefaultBurstTokens))
	var others noOtherResources
	podresourcesapi.RegisterPodResourcesListerServer(server, podresources.NewV1PodResourcesServer(ctx, podresources.PodResourcesProviders{
		Pods:             podsProvider{h},
		Devices:          devicesProvider{h},
		Cpus:             others,
		Memory:           others,
		DynamicResources: others,
	}))
	l, err := criutil.CreateListener("unix://" + socket)
	if err != nil {
		return err
	}
	go func() { _ = server.Serve(l) }()
	return nil
}

func (h *harness) start() error {
	topology := []cadvisorapi.Node{{Id: 0}, {Id: 1}}
	m, err := newManagerImpl(h.logger, h.socket, topology, topologymanager.NewFakeManager(h.logger))
	if err != nil {
		return err
	}
	if err := m.Start(h.logger, h.activePods, sourcesReady{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		return err
	}
	h.mgr.Store(m)
	return nil
}

type deviceView struct {
	Capacity    map[string]int64              `json:"capacity"`
	Allocatable map[string]int64              `json:"allocatable"`
	Healthy     map[string]map[string][]int64 `json:"healthy"` // resource -> device ID -> NUMA nodes
}

func (h *harness) devices() deviceView {
	capacity, allocatable, _ := h.m().GetCapacity(h.logger)
	v := deviceView{Capacity: map[string]int64{}, Allocatable: map[string]int64{}, Healthy: map[string]map[string][]int64{}}
	for k, q := range capacity {
		v.Capacity[string(k)] = q.Value()
	}
	for k, q := range allocatable {
		v.Allocatable[string(k)] = q.Value()
	}
	for res, devs := range h.m().GetAllocatableDevices(h.logger) {
		v.Healthy[res] = map[string][]int64{}
		for id, d := range devs {
			numa := []int64{}
			if d.Topology != nil {
				for _, n := range d.Topology.Nodes {
					numa = append(numa, n.ID)
				}
			}
			v.Healthy[res][id] = numa
		}
	}
	return v
}

// podKey splits "namespace/name" (namespace "default" when absent).
func podKey(s string) (namespace, name string) {
	if ns, n, ok := strings.Cut(s, "/"); ok {
		return ns, n
	}
	return "default", s
}

func newPod(namespace, name, container, res string, n int64) *v1.Pod {
	q := *resource.NewQuantity(n, resource.DecimalSI)
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, UID: types.UID("uid-" + namespace + "-" + name)},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name: container,
			Resources: v1.ResourceRequirements{
				Limits:   v1.ResourceList{v1.ResourceName(res): q},
				Requests: v1.ResourceList{v1.ResourceName(res): q},
			},
		}}},
	}
}

type allocation struct {
	Devices     []string          `json:"devices"`
	Envs        map[string]string `json:"envs"`
	CDIDevices  []string          `json:"cdiDevices"`
	Annotations map[string]string `json:"annotations"`
	Micros      int64             `json:"micros"`
}

func (h *harness) allocate(key, container, res string, n int64) (*allocation, error) {
	namespace, name := podKey(key)
	pod := newPod(namespace, name, container, res, n)
	key = namespace + "/" + name
	h.mu.Lock()
	h.pods[key] = pod
	h.mu.Unlock()
	ctx := context.Background()
	t0 := time.Now()
	err := h.m().Allocate(ctx, pod, &pod.Spec.Containers[0], lifecycle.AddOperation)
	took := time.Since(t0)
	if err != nil {
		h.free(key)
		return nil, err
	}
	opts, err := h.m().GetDeviceRunContainerOptions(ctx, pod, &pod.Spec.Containers[0])
	if err != nil {
		h.free(key)
		return nil, err
	}
	a := &allocation{Envs: map[string]string{}, Annotations: map[string]string{}, CDIDevices: []string{}, Micros: took.Microseconds()}
	for _, ids := range h.m().GetDevices(string(pod.UID), container) {
		for id := range ids {
			a.Devices = append(a.Devices, id)
		}
	}
	sort.Strings(a.Devices)
	for _, e := range opts.Envs {
		a.Envs[e.Name] = e.Value
	}
	for _, c := range opts.CDIDevices {
		a.CDIDevices = append(a.CDIDevices, c.Name)
	}
	for _, an := range opts.Annotations {
		a.Annotations[an.Name] = an.Value
	}
	return a, nil
}

func (h *harness) free(key string) {
	namespace, name := podKey(key)
	h.mu.Lock()
	delete(h.pods, namespace+"/"+name)
	h.mu.Unlock()
}

func (h *harness) bench(res string, n int64, iters int) (map[string]any, error) {
	var micros []float64
	for i := 0; i < iters; i++ {
		name := fmt.Sprintf("bench-%d", i)
		a, err := h.allocate(name, "main", res, n)
		if err != nil {
			return nil, err
		}
		micros = append(micros, float64(a.Micros))
		h.free(name)
	}
	sort.Float64s(micros)
	pct := func(p float64) float64 { return micros[int(p*float64(len(micros)-1))] }
	out := map[string]any{"iterations": iters, "p50_us": pct(0.5), "p99_us": pct(0.99), "max_us": micros[len(micros)-1]}
	// The kubelet's own measurement of the Allocate RPC: kubelet_device_plugin_alloc_duration_seconds.
	families, err := kubeletmetrics.GetGather().Gather()
	if err != nil {
		return nil, err
	}
	for _, f := range families {
		if f.GetName() != "kubelet_device_plugin_alloc_duration_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			hist := m.GetHistogram()
			buckets := map[string]uint64{}
			p99Bound := ""
			for _, b := range hist.GetBucket() {
				le := strconv.FormatFloat(b.GetUpperBound(), 'g', -1, 64)
				buckets[le] = b.GetCumulativeCount()
				if p99Bound == "" && float64(b.GetCumulativeCount()) >= 0.99*float64(hist.GetSampleCount()) {
					p99Bound = le
				}
			}
			out["kubelet_histogram"] = map[string]any{
				"count": hist.GetSampleCount(), "mean_us": hist.GetSampleSum() / float64(hist.GetSampleCount()) * 1e6,
				"p99_upper_bound_seconds": p99Bound, "buckets": buckets,
			}
		}
	}
	return out, nil
}

func (h *harness) wait(res string, healthy, total int64, timeout time.Duration) (deviceView, error) {
	deadline := time.Now().Add(timeout)
	for {
		v := h.devices()
		if v.Allocatable[res] == healthy && v.Capacity[res] == total {
			return v, nil
		}
		if time.Now().After(deadline) {
			return v, fmt.Errorf("timed out after %v waiting for %s to show %d healthy of %d; it shows %d of %d",
				timeout, res, healthy, total, v.Allocatable[res], v.Capacity[res])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (h *harness) run(line string) (any, error) {
	f := strings.Fields(line)
	if len(f) == 0 {
		return nil, fmt.Errorf("empty command")
	}
	num := func(i int) int64 {
		if i >= len(f) {
			return -1
		}
		v, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			return -1
		}
		return v
	}
	switch f[0] {
	case "devices":
		return h.devices(), nil
	case "wait":
		if len(f) != 5 || num(2) < 0 || num(3) < 0 || num(4) < 0 {
			return nil, fmt.Errorf("usage: wait <resource> <healthy> <total> <timeout_ms>")
		}
		return h.wait(f[1], num(2), num(3), time.Duration(num(4))*time.Millisecond)
	case "allocate":
		if (len(f) != 4 && len(f) != 5) || num(3) < 1 {
			return nil, fmt.Errorf("usage: allocate <[namespace/]pod> <resource> <n> [container]")
		}
		container := "main"
		if len(f) == 5 {
			container = f[4]
		}
		return h.allocate(f[1], container, f[2], num(3))
	case "free":
		if len(f) != 2 {
			return nil, fmt.Errorf("usage: free <[namespace/]pod>")
		}
		h.free(f[1])
		return map[string]string{}, nil
	case "restart":
		if err := h.m().Stop(h.logger); err != nil {
			return nil, err
		}
		return map[string]string{"socket": h.socket}, h.start()
	case "bench":
		if len(f) != 4 || num(3) < 1 || num(2) < 1 {
			return nil, fmt.Errorf("usage: bench <resource> <n> <iterations>")
		}
		return h.bench(f[1], num(2), int(num(3)))
	}
	return nil, fmt.Errorf("unknown command %q (devices, wait, allocate, free, restart, bench, quit)", f[0])
}

func main() {
	dir := flag.String("dir", "", "directory for kubelet.sock and the device manager checkpoint (required)")
	podResources := flag.String("pod-resources", "", "also serve the kubelet pod-resources API v1 on this unix socket")
	klog.InitFlags(nil)
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "devicemanager-harness: --dir is required: the directory the kubelet socket is created in")
		os.Exit(2)
	}
	kubeletmetrics.Register()
	h := &harness{logger: klog.Background(), socket: filepath.Join(*dir, "kubelet.sock"), pods: map[string]*v1.Pod{}}
	out := json.NewEncoder(os.Stdout)
	if err := h.start(); err != nil {
		_ = out.Encode(map[string]any{"ok": false, "error": "starting the device manager: " + err.Error()})
		os.Exit(1)
	}
	ready := map[string]string{"socket": h.socket}
	if *podResources != "" {
		if err := h.servePodResources(*podResources); err != nil {
			_ = out.Encode(map[string]any{"ok": false, "error": "serving the pod-resources API on " + *podResources + ": " + err.Error()})
			os.Exit(1)
		}
		ready["podResources"] = *podResources
	}
	_ = out.Encode(map[string]any{"ok": true, "result": ready})
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		line := strings.TrimSpace(in.Text())
		if line == "quit" {
			break
		}
		res, err := h.run(line)
		if err != nil {
			_ = out.Encode(map[string]any{"ok": false, "error": err.Error(), "result": res})
			continue
		}
		_ = out.Encode(map[string]any{"ok": true, "result": res})
	}
	_ = h.m().Stop(h.logger)
}
