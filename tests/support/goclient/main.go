// A Go program fetching one URL as most Go programs do: net/http's default transport, the proxy
// from HTTP_PROXY / HTTPS_PROXY. It prints the response's status line, or the error, as a
// user of such a program sees it, and exits 1 on an error.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	client := &http.Client{Timeout: 20 * time.Second}
	resp, err := client.Get(os.Args[1])
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	fmt.Println(resp.Status)
}
