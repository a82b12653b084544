// gocni-client drives one pod network namespace through containerd's CNI
// library, go-cni, the way containerd 1.6's CRI plugin does (its
// pkg/cri/server: initPlatform, cniLoadOptions, setupPodNetwork,
// cniNamespaceOpts, teardownPodNetwork). nerdctl and kubelet-through-
// containerd reach CNI plugins through this same library, so what it sends
// (Go-cased capability args, labels as CNI_ARGS, the loopback network run
// beside ours) is what a plugin meets in those runtimes.
//
// Usage:
//
//	gocni-client -conf-dir DIR -plugin-dirs DIR[:DIR...] [options] setup|check|remove ID NETNS
//
// setup prints the go-cni Result as JSON on stdout (containerd logs the same
// marshalling); errors go to stderr with exit code 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"strings"
	"time"

	cni "github.com/containerd/go-cni"
)

// The CNI capability containerd passes the pod's annotations under
// (pkg/cri/annotations.PodAnnotations).
const podAnnotations = "io.kubernetes.cri.pod-annotations"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "gocni-client: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	confDir := flag.String("conf-dir", "", "CNI config dir; its first file is the pod network (containerd's conf_dir)")
	pluginDirs := flag.String("plugin-dirs", "", "colon-separated CNI plugin dirs (containerd's bin_dir)")
	podName := flag.String("pod-name", "pod", "K8S_POD_NAME")
	podNamespace := flag.String("pod-namespace", "default", "K8S_POD_NAMESPACE")
	podUID := flag.String("pod-uid", "", "K8S_POD_UID")
	ports := flag.String("ports", "", `the pod's port mappings, JSON: [{"hostPort":8080,"containerPort":80,"protocol":"TCP","hostIP":""}]`)
	alwaysPorts := flag.Bool("always-ports", false, "pass portMappings even when there are none (an empty list), as go-cni users such as Nomad do; containerd 1.6's CRI leaves it out")
	ingressRate := flag.Uint64("ingress-rate", 0, "ingress limit in bit/s (containerd: the kubernetes.io/ingress-bandwidth annotation)")
	egressRate := flag.Uint64("egress-rate", 0, "egress limit in bit/s (containerd: the kubernetes.io/egress-bandwidth annotation)")
	ipRanges := flag.String("ip-ranges", "", `ipRanges through go-cni's WithCapabilityIPRanges, JSON: [{"subnet":"10.89.7.0/24"}] (not used by containerd 1.6's CRI)`)
	ipRangeSets := flag.String("ip-range-sets", "", `ipRanges as a list of range sets, the shape host-local reads, through WithCapability: [[{"subnet":"10.89.7.0/24"}]]`)
	annotations := flag.String("annotations", "", "the pod's annotations, a JSON object")
	dns := flag.String("dns", "", `the pod's DNS config, JSON: {"servers":[...],"searches":[...],"options":[...]}`)
	timeout := flag.Duration("timeout", 60*time.Second, "give up after this long")
	flag.Parse()

	if flag.NArg() != 3 {
		return fmt.Errorf("want VERB ID NETNS after the options, got %q", flag.Args())
	}
	verb, id, netns := flag.Arg(0), flag.Arg(1), flag.Arg(2)
	if *confDir == "" || *pluginDirs == "" {
		return fmt.Errorf("-conf-dir and -plugin-dirs are required")
	}

	// containerd's initPlatform: the loopback network plus ours, hence a
	// minimum of two networks; one config file (max_conf_num's default).
	// The interface prefix stays go-cni's default, "eth", as in containerd.
	// containerd's CRI never calls Check, and go-cni's built-in loopback
	// network is version 0.3.1, which has no CHECK: check uses a go-cni
	// instance with our network alone.
	networks, loads := 2, []cni.Opt{cni.WithLoNetwork, cni.WithDefaultConf}
	if verb == "check" {
		networks, loads = 1, []cni.Opt{cni.WithDefaultConf}
	}
	lib, err := cni.New(
		cni.WithMinNetworkCount(networks),
		cni.WithPluginConfDir(*confDir),
		cni.WithPluginMaxConfNum(1),
		cni.WithPluginDir(strings.Split(*pluginDirs, ":")),
	)
	if err != nil {
		return fmt.Errorf("initializing go-cni: %w", err)
	}
	// containerd's cniLoadOptions on Linux.
	if err := lib.Load(loads...); err != nil {
		return fmt.Errorf("loading the CNI config from %s: %w", *confDir, err)
	}

	// cniNamespaceOpts: labels (CNI_ARGS) and the pod's annotations always;
	// port mappings, bandwidth and DNS only when the pod has them.
	var podAnn map[string]string // nil, like a pod without annotations
	if err := decode("-annotations", *annotations, &podAnn); err != nil {
		return err
	}
	opts := []cni.NamespaceOpts{
		cni.WithLabels(map[string]string{
			"K8S_POD_NAMESPACE":          *podNamespace,
			"K8S_POD_NAME":               *podName,
			"K8S_POD_INFRA_CONTAINER_ID": id,
			"K8S_POD_UID":                *podUID,
			"IgnoreUnknown":              "1",
		}),
		cni.WithCapability(podAnnotations, podAnn),
	}

	// Decoded with Go's usual case-insensitive field matching, then
	// converted as toCNIPortMappings does: hostPort 0 dropped, protocol
	// lower-cased. go-cni marshals cni.PortMapping without JSON tags, so the
	// plugin receives {"HostPort":…,"ContainerPort":…,"Protocol":…,"HostIP":…}.
	var given []cni.PortMapping
	if err := decode("-ports", *ports, &given); err != nil {
		return err
	}
	mappings := []cni.PortMapping{} // non-nil: marshals as [] rather than null
	for _, m := range given {
		if m.HostPort <= 0 {
			continue
		}
		m.Protocol = strings.ToLower(m.Protocol)
		mappings = append(mappings, m)
	}
	if len(mappings) > 0 || *alwaysPorts {
		opts = append(opts, cni.WithCapabilityPortMap(mappings))
	}

	// toCNIBandWidth: a rate from the pod's annotations, the burst at its
	// maximum.
	if *ingressRate > 0 || *egressRate > 0 {
		bw := cni.BandWidth{}
		if *ingressRate > 0 {
			bw.IngressRate, bw.IngressBurst = *ingressRate, math.MaxUint32
		}
		if *egressRate > 0 {
			bw.EgressRate, bw.EgressBurst = *egressRate, math.MaxUint32
		}
		opts = append(opts, cni.WithCapabilityBandWidth(bw))
	}

	if *ipRanges != "" {
		var ranges []cni.IPRanges
		if err := decode("-ip-ranges", *ipRanges, &ranges); err != nil {
			return err
		}
		opts = append(opts, cni.WithCapabilityIPRanges(ranges))
	}
	// go-cni's own option sends one flat list, while host-local reads a list
	// of range sets; a caller that wants host-local to use the ranges passes
	// them this way.
	if *ipRangeSets != "" {
		var sets [][]cni.IPRanges
		if err := decode("-ip-range-sets", *ipRangeSets, &sets); err != nil {
			return err
		}
		opts = append(opts, cni.WithCapability("ipRanges", sets))
	}

	if *dns != "" {
		var d cni.DNS
		if err := decode("-dns", *dns, &d); err != nil {
			return err
		}
		opts = append(opts, cni.WithCapabilityDNS(d))
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	switch verb {
	case "setup":
		result, err := lib.Setup(ctx, id, netns, opts...)
		if err != nil {
			return fmt.Errorf("setup: %w", err)
		}
		out, err := json.Marshal(result)
		if err != nil {
			return fmt.Errorf("marshalling the result: %w", err)
		}
		fmt.Println(string(out))
	case "check":
		if err := lib.Check(ctx, id, netns, opts...); err != nil {
			return fmt.Errorf("check: %w", err)
		}
	case "remove":
		if err := lib.Remove(ctx, id, netns, opts...); err != nil {
			return fmt.Errorf("remove: %w", err)
		}
	default:
		return fmt.Errorf("unknown verb %q (setup, check, remove)", verb)
	}
	return nil
}

// decode parses the JSON value of a flag, if the flag was given.
func decode(name, text string, into interface{}) error {
	if text == "" {
		return nil
	}
	if err := json.Unmarshal([]byte(text), into); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}
