// Command loadgen drives a forward proxy through CONNECT tunnels at a fixed concurrency.
//
// wrk covers absolute-form HTTP GETs; this covers what wrk cannot: tunnels. Go's TLS and
// goroutines keep the generator's own cost per operation well below the proxy's, so with the
// generator pinned to the other CPU it is not the bottleneck being measured.
//
// Modes (-mode):
//
//	connect-tls  each iteration: new TCP connection, CONNECT, TLS handshake, one GET, close
//	tunnel-gets  -c kept tunnels (CONNECT + TLS once), GETs back to back inside each
//	bulk         -c kept tunnels, each downloads -path again and again; counts bytes
//	idle         open -c tunnels (TLS done), report, wait for a line on stdin, then one GET
//	             on every tunnel and count the answers
//	http-close   plain HTTP, a new connection per GET, closed loop (overload.go)
//	flood        plain HTTP, a new connection per GET, open loop at -rate (overload.go)
//
// Every mode is bounded in time (-warmup + -duration) and in count (-max-ops). Protocol on
// stdout, for the orchestrator (bench/run.py), which samples the proxy's /proc at each marker:
//
//	MEASURE          the measured window starts (warm-up done)
//	END              the measured window ended
//	OPEN             (idle) every tunnel is open and idle
//	{...}            last line: the result as one JSON object
package main

import (
	"bufio"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

type config struct {
	mode           string
	proxy          string
	target         string
	sni            string
	path           string
	conc           int
	warmup         time.Duration
	duration       time.Duration
	maxOps         int64
	openPar        int
	timeout        time.Duration
	rate           float64
	maxOutstanding int
}

type result struct {
	Mode        string   `json:"mode"`
	Concurrency int      `json:"concurrency"`
	Ops         int64    `json:"ops"`
	Errors      int64    `json:"errors"`
	FirstError  string   `json:"first_error,omitempty"`
	Seconds     float64  `json:"seconds"`
	OpsPerSec   float64  `json:"ops_per_sec"`
	Bytes       int64    `json:"bytes"`
	P50Ms       *float64 `json:"p50_ms"`
	P99Ms       *float64 `json:"p99_ms"`
	Opened      int      `json:"opened,omitempty"`
	Answered    int64    `json:"answered,omitempty"`
}

// stats collects what the measured window saw. Workers record into it only while `on`.
type stats struct {
	on       atomic.Bool
	ops      atomic.Int64
	errs     atomic.Int64
	bytes    atomic.Int64
	mu       sync.Mutex
	lat      []float64
	firstErr string
}

func (s *stats) record(start time.Time, n int64) {
	if !s.on.Load() {
		return
	}
	s.ops.Add(1)
	s.bytes.Add(n)
	ms := float64(time.Since(start).Microseconds()) / 1000.0
	s.mu.Lock()
	s.lat = append(s.lat, ms)
	s.mu.Unlock()
}

func (s *stats) fail(err error) {
	s.errs.Add(1)
	s.mu.Lock()
	if s.firstErr == "" {
		s.firstErr = err.Error()
	}
	s.mu.Unlock()
}

func percentile(sorted []float64, p float64) *float64 {
	if len(sorted) == 0 {
		return nil
	}
	i := int(p * float64(len(sorted)-1))
	v := sorted[i]
	return &v
}

// openTunnel connects to the proxy, asks for a tunnel and completes a TLS handshake inside it.
func openTunnel(cfg *config) (*tls.Conn, *bufio.Reader, error) {
	raw, err := net.DialTimeout("tcp", cfg.proxy, cfg.timeout)
	if err != nil {
		return nil, nil, err
	}
	_ = raw.SetDeadline(time.Now().Add(cfg.timeout))
	fmt.Fprintf(raw, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", cfg.target, cfg.target)
	br := bufio.NewReaderSize(raw, 4096)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("CONNECT: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		raw.Close()
		return nil, nil, fmt.Errorf("CONNECT answered %d", resp.StatusCode)
	}
	if br.Buffered() > 0 {
		raw.Close()
		return nil, nil, errors.New("bytes after the CONNECT response")
	}
	conn := tls.Client(raw, &tls.Config{
		ServerName: cfg.sni,
		// The origin's certificate is the bench's own; verifying it would only add generator
		// CPU. The handshake the proxy relays is the same either way.
		InsecureSkipVerify: true, //nolint:gosec
		CurvePreferences:   []tls.CurveID{tls.X25519},
	})
	if err := conn.Handshake(); err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("TLS: %w", err)
	}
	_ = raw.SetDeadline(time.Time{})
	return conn, bufio.NewReaderSize(conn, 64*1024), nil
}

// get sends one GET on a kept connection and reads the whole response; returns body bytes.
func get(cfg *config, conn net.Conn, br *bufio.Reader, request []byte) (int64, error) {
	_ = conn.SetDeadline(time.Now().Add(cfg.timeout))
	if _, err := conn.Write(request); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return n, err
	}
	if resp.StatusCode != http.StatusOK {
		return n, fmt.Errorf("GET answered %d", resp.StatusCode)
	}
	return n, nil
}

func requestBytes(cfg *config, close bool) []byte {
	extra := ""
	if close {
		extra = "Connection: close\r\n"
	}
	return []byte(fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: outgate-bench\r\n%s\r\n",
		cfg.path, cfg.sni, extra))
}

// runWindow runs `worker` on cfg.conc goroutines through warm-up and the measured window.
func runWindow(cfg *config, st *stats, worker func(stop *atomic.Bool)) float64 {
	var stop atomic.Bool
	var wg sync.WaitGroup
	for i := 0; i < cfg.conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			worker(&stop)
		}()
	}
	time.Sleep(cfg.warmup)
	fmt.Println("MEASURE")
	st.on.Store(true)
	start := time.Now()
	deadline := start.Add(cfg.duration)
	for time.Now().Before(deadline) && st.ops.Load() < cfg.maxOps {
		time.Sleep(10 * time.Millisecond)
	}
	st.on.Store(false)
	elapsed := time.Since(start).Seconds()
	fmt.Println("END")
	stop.Store(true)
	waitTimeout(&wg, cfg.timeout)
	return elapsed
}

func waitTimeout(wg *sync.WaitGroup, limit time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(limit):
	}
}

func modeConnectTLS(cfg *config, st *stats) float64 {
	request := requestBytes(cfg, true)
	return runWindow(cfg, st, func(stop *atomic.Bool) {
		for !stop.Load() {
			start := time.Now()
			conn, br, err := openTunnel(cfg)
			if err != nil {
				st.fail(err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			n, err := get(cfg, conn, br, request)
			conn.Close()
			if err != nil {
				st.fail(err)
				continue
			}
			st.record(start, n)
		}
	})
}

func modeKept(cfg *config, st *stats) float64 {
	request := requestBytes(cfg, false)
	return runWindow(cfg, st, func(stop *atomic.Bool) {
		var conn *tls.Conn
		var br *bufio.Reader
		for !stop.Load() {
			if conn == nil {
				var err error
				if conn, br, err = openTunnel(cfg); err != nil {
					st.fail(err)
					conn = nil
					time.Sleep(10 * time.Millisecond)
					continue
				}
			}
			start := time.Now()
			n, err := getCounting(cfg, st, conn, br, request)
			if err != nil {
				if !stop.Load() {
					st.fail(err)
				}
				conn.Close()
				conn = nil
				continue
			}
			if cfg.mode == "tunnel-gets" {
				st.record(start, 0)
			} else if st.on.Load() {
				st.ops.Add(1)
			}
			_ = n
		}
		if conn != nil {
			conn.Close()
		}
	})
}

// getCounting is `get` for bulk downloads: bytes count as they arrive, so a window that ends in
// the middle of a large body still counts what the proxy moved inside it.
func getCounting(cfg *config, st *stats, conn net.Conn, br *bufio.Reader, request []byte) (int64, error) {
	if cfg.mode != "bulk" {
		return get(cfg, conn, br, request)
	}
	_ = conn.SetDeadline(time.Now().Add(cfg.timeout))
	if _, err := conn.Write(request); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	buf := make([]byte, 256*1024)
	var total int64
	for {
		_ = conn.SetDeadline(time.Now().Add(cfg.timeout))
		n, err := resp.Body.Read(buf)
		total += int64(n)
		if st.on.Load() {
			st.bytes.Add(int64(n))
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

func modeIdle(cfg *config, st *stats) (float64, int, int64) {
	type tunnel struct {
		conn *tls.Conn
		br   *bufio.Reader
	}
	tunnels := make([]tunnel, 0, cfg.conc)
	var mu sync.Mutex
	var wg sync.WaitGroup
	jobs := make(chan struct{}, cfg.conc)
	for i := 0; i < cfg.conc; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	for i := 0; i < cfg.openPar; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				conn, br, err := openTunnel(cfg)
				if err != nil {
					st.fail(err)
					continue
				}
				mu.Lock()
				tunnels = append(tunnels, tunnel{conn, br})
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("OPEN %d\n", len(tunnels))
	// Idle until the orchestrator has measured memory and says go (bounded by -timeout).
	line := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		close(line)
	}()
	select {
	case <-line:
	case <-time.After(cfg.timeout):
	}
	st.on.Store(true)
	start := time.Now()
	request := requestBytes(cfg, true)
	var answered atomic.Int64
	sem := make(chan struct{}, cfg.openPar)
	for _, t := range tunnels {
		wg.Add(1)
		sem <- struct{}{}
		go func(t tunnel) {
			defer wg.Done()
			defer func() { <-sem }()
			began := time.Now()
			n, err := get(cfg, t.conn, t.br, request)
			t.conn.Close()
			if err != nil {
				st.fail(err)
				return
			}
			answered.Add(1)
			st.record(began, n)
		}(t)
	}
	wg.Wait()
	st.on.Store(false)
	return time.Since(start).Seconds(), len(tunnels), answered.Load()
}

func main() {
	cfg := &config{}
	flag.StringVar(&cfg.mode, "mode", "connect-tls",
		"connect-tls | tunnel-gets | bulk | idle | http-close | flood")
	flag.StringVar(&cfg.proxy, "proxy", "127.0.0.1:3128", "proxy address")
	flag.StringVar(&cfg.target, "target", "", "CONNECT target host:port")
	flag.StringVar(&cfg.sni, "sni", "", "TLS server name and Host (default: the target's host)")
	flag.StringVar(&cfg.path, "path", "/small", "path to GET inside the tunnel")
	flag.IntVar(&cfg.conc, "c", 10, "concurrency (idle: tunnels to open)")
	flag.DurationVar(&cfg.warmup, "warmup", 2*time.Second, "warm-up before the measured window")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "measured window")
	flag.Int64Var(&cfg.maxOps, "max-ops", 5_000_000, "stop the window after this many operations")
	flag.IntVar(&cfg.openPar, "open-parallel", 100, "idle: tunnels opened (and asked) at once")
	flag.DurationVar(&cfg.timeout, "timeout", 60*time.Second, "per-operation and idle-wait bound")
	flag.Float64Var(&cfg.rate, "rate", 1000, "flood: new connections a second")
	flag.IntVar(&cfg.maxOutstanding, "max-outstanding", 20000, "flood: connections open at once")
	flag.Parse()
	if cfg.target == "" {
		fmt.Fprintln(os.Stderr, "-target host:port is required")
		os.Exit(2)
	}
	if cfg.sni == "" {
		host, _, err := net.SplitHostPort(cfg.target)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		cfg.sni = host
	}
	st := &stats{}
	res := result{Mode: cfg.mode, Concurrency: cfg.conc}
	switch cfg.mode {
	case "connect-tls":
		res.Seconds = modeConnectTLS(cfg, st)
	case "tunnel-gets", "bulk":
		res.Seconds = modeKept(cfg, st)
	case "idle":
		res.Seconds, res.Opened, res.Answered = modeIdle(cfg, st)
	case "http-close":
		res.Seconds = modeHTTPClose(cfg, st)
	case "flood":
		printJSON(modeFlood(cfg))
		return
	default:
		fmt.Fprintln(os.Stderr, "unknown -mode", cfg.mode)
		os.Exit(2)
	}
	st.mu.Lock()
	sort.Float64s(st.lat)
	res.P50Ms = percentile(st.lat, 0.50)
	res.P99Ms = percentile(st.lat, 0.99)
	res.FirstError = st.firstErr
	st.mu.Unlock()
	res.Ops = st.ops.Load()
	res.Errors = st.errs.Load()
	res.Bytes = st.bytes.Load()
	if res.Seconds > 0 {
		res.OpsPerSec = float64(res.Ops) / res.Seconds
	}
	printJSON(res)
}
