// Command etcd is the real etcd server, built from go.etcd.io/etcd/server/v3 at the version
// k8s.io/kubernetes v1.37.2 itself depends on.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
