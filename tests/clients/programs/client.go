// Go's net/http as an application uses it behind a proxy: the default transport reads
// HTTP_PROXY / HTTPS_PROXY / NO_PROXY; SSL_CERT_FILE names the CA bundle. Standard library only.
//
//	client METHOD URL [BODY]   prints {"status", "reason", "headers", "body"}
//
// A failure prints the error as the application would log it and exits 1.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	method, url := os.Args[1], os.Args[2]
	var body io.Reader
	if len(os.Args) > 3 {
		body = strings.NewReader(os.Args[3])
	}
	request, err := http.NewRequest(method, url, body)
	if err != nil {
		fail(err)
	}
	client := &http.Client{Timeout: 15 * time.Second}
	response, err := client.Do(request)
	if err != nil {
		fail(err)
	}
	defer response.Body.Close()
	content, err := io.ReadAll(response.Body)
	if err != nil {
		fail(err)
	}
	headers := map[string]string{}
	for name := range response.Header {
		headers[strings.ToLower(name)] = response.Header.Get(name)
	}
	// response.Status is the status line after the version: "403 Forbidden ...".
	_, reason, _ := strings.Cut(response.Status, " ")
	out, _ := json.Marshal(map[string]any{
		"status": response.StatusCode, "reason": reason, "headers": headers, "body": string(content),
	})
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
