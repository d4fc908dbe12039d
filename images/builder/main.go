// oci-image-builder assembles gpu-pilot's container images from layer tarballs with
// go-containerregistry (mutate, layout): one OCI image per platform, an OCI image index over them,
// written to an OCI image layout that `crane push` sends to any registry. It writes no tar and no
// manifest by hand: the layers are tarballs made by GNU tar (sorted, fixed owner and mtime), and
// every manifest, config and digest comes from the library.
//
//	oci-image-builder --out DIR --tag v0.1.0 --created 2026-01-01T00:00:00Z \
//	  --label org.opencontainers.image.version=v0.1.0 --user 65532:65532 \
//	  --entrypoint /usr/local/bin/gpu-pilot-controller \
//	  --platform linux/amd64=base-amd64.tar,controller-amd64.tar
//
// The same inputs give the same digests: the config's created time is --created, history entries
// carry that time too, and gzip output depends only on the bytes and this binary.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

// platformLayers is one --platform value: os/arch[/variant]=layer.tar[,layer.tar...].
type platformLayers struct {
	platform v1.Platform
	layers   []string
}

// summary is what --summary writes: the digests and sizes the figures script reports.
type summary struct {
	Tag       string            `json:"tag"`
	Digest    string            `json:"digest"`
	Platforms []platformSummary `json:"platforms"`
}

type platformSummary struct {
	Platform     string `json:"platform"`
	Digest       string `json:"digest"`
	Compressed   int64  `json:"compressedBytes"`
	Uncompressed int64  `json:"uncompressedBytes"`
	Layers       int    `json:"layers"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "oci-image-builder: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		out, tag, created, user, workdir, summaryPath string
		labels, envs, entrypoint, cmd, platforms     list
	)
	flag.StringVar(&out, "out", "", "OCI image layout to write (replaced if it exists)")
	flag.StringVar(&tag, "tag", "", "tag recorded as the layout entry's org.opencontainers.image.ref.name")
	flag.StringVar(&created, "created", "1970-01-01T00:00:00Z", "the images' created time (RFC 3339)")
	flag.StringVar(&user, "user", "", "user (and group) the container runs as, e.g. 65532:65532")
	flag.StringVar(&workdir, "workdir", "/", "working directory")
	flag.StringVar(&summaryPath, "summary", "", "write digests and sizes as JSON to this file")
	flag.Var(&labels, "label", "config label key=value (repeatable)")
	flag.Var(&envs, "env", "environment variable KEY=value (repeatable)")
	flag.Var(&entrypoint, "entrypoint", "entrypoint word (repeatable, in order)")
	flag.Var(&cmd, "cmd", "cmd word (repeatable, in order)")
	flag.Var(&platforms, "platform", "os/arch=layer.tar[,layer.tar...] (repeatable: one image per platform)")
	flag.Parse()
	if out == "" || tag == "" || len(platforms) == 0 {
		return errors.New("--out, --tag and at least one --platform are required (see -h)")
	}
	when, err := time.Parse(time.RFC3339, created)
	if err != nil {
		return fmt.Errorf("--created %q is not an RFC 3339 time: %w", created, err)
	}
	labelMap := map[string]string{}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return fmt.Errorf("--label %q is not key=value", l)
		}
		labelMap[k] = v
	}
	for _, e := range envs {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return fmt.Errorf("--env %q is not KEY=value", e)
		}
	}
	var specs []platformLayers
	for _, p := range platforms {
		spec, err := parsePlatform(p)
		if err != nil {
			return err
		}
		specs = append(specs, spec)
	}

	config := v1.Config{
		Entrypoint: entrypoint,
		Cmd:        cmd,
		Env:        envs,
		User:       user,
		WorkingDir: workdir,
		Labels:     labelMap,
	}
	index := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	sum := summary{Tag: tag}
	for _, spec := range specs {
		img, ps, err := buildImage(spec, config, v1.Time{Time: when.UTC()})
		if err != nil {
			return err
		}
		platform := spec.platform
		index = mutate.AppendManifests(index, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &platform},
		})
		sum.Platforms = append(sum.Platforms, ps)
	}
	// The index carries the same labels as annotations, as registries show an index's own.
	index = mutate.Annotations(index, labelMap).(v1.ImageIndex)
	digest, err := index.Digest()
	if err != nil {
		return err
	}
	sum.Digest = digest.String()

	if err := os.RemoveAll(out); err != nil {
		return err
	}
	lp, err := layout.Write(out, empty.Index)
	if err != nil {
		return fmt.Errorf("writing the layout %s: %w", out, err)
	}
	if err := lp.AppendIndex(index, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return fmt.Errorf("writing the index to %s: %w", out, err)
	}
	if summaryPath != "" {
		b, err := json.MarshalIndent(sum, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(summaryPath, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	fmt.Println(sum.Digest)
	return nil
}

func parsePlatform(s string) (platformLayers, error) {
	name, files, ok := strings.Cut(s, "=")
	if !ok || files == "" {
		return platformLayers{}, fmt.Errorf("--platform %q is not os/arch=layer.tar[,layer.tar...]", s)
	}
	p, err := v1.ParsePlatform(name)
	if err != nil || p.OS == "" || p.Architecture == "" {
		return platformLayers{}, fmt.Errorf("--platform %q: %q is not os/arch", s, name)
	}
	spec := platformLayers{platform: *p}
	for _, f := range strings.Split(files, ",") {
		if _, err := os.Stat(f); err != nil {
			return platformLayers{}, fmt.Errorf("--platform %s: layer %w", name, err)
		}
		spec.layers = append(spec.layers, f)
	}
	return spec, nil
}

func buildImage(spec platformLayers, config v1.Config, created v1.Time) (v1.Image, platformSummary, error) {
	ps := platformSummary{Platform: spec.platform.String(), Layers: len(spec.layers)}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, path := range spec.layers {
		layer, err := tarball.LayerFromFile(path, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, ps, fmt.Errorf("layer %s: %w", path, err)
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer: layer,
			History: v1.History{
				Created:   created,
				CreatedBy: "gpu-pilot scripts/images: " + filepath.Base(path),
			},
		})
		if err != nil {
			return nil, ps, err
		}
		size, err := layer.Size()
		if err != nil {
			return nil, ps, err
		}
		ps.Compressed += size
		st, err := os.Stat(path)
		if err != nil {
			return nil, ps, err
		}
		ps.Uncompressed += st.Size()
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, ps, err
	}
	cf = cf.DeepCopy()
	cf.Config = config
	cf.Created = created
	cf.OS = spec.platform.OS
	cf.Architecture = spec.platform.Architecture
	cf.Variant = spec.platform.Variant
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, ps, err
	}
	digest, err := img.Digest()
	if err != nil {
		return nil, ps, err
	}
	ps.Digest = digest.String()
	return img, ps, nil
}
