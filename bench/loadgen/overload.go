package main

// Modes for bench/overload.py: plain HTTP through the proxy, one request per new connection.
//
//	http-close  closed loop: -c goroutines, each a new connection, one absolute-form GET with
//	            Connection: close, the whole response, close; what the proxy serves flat out
//	flood       open loop: -rate new connections a second for -duration whatever the answers
//	            (at most -max-outstanding at once; the rest are counted as not started), each
//	            one GET; counts every status, refusals without Retry-After, and answer times

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

func absoluteGet(cfg *config) []byte {
	return []byte(fmt.Sprintf("GET http://%s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: outgate-bench\r\n"+
		"Connection: close\r\n\r\n", cfg.target, cfg.path, cfg.target))
}

// oneRequest dials the proxy, sends `request` and reads the whole response.
func oneRequest(cfg *config, request []byte) (*http.Response, error) {
	conn, err := net.DialTimeout("tcp", cfg.proxy, cfg.timeout)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(cfg.timeout))
	if _, err := conn.Write(request); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 4096), nil)
	if err != nil {
		return nil, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp, err
}

func modeHTTPClose(cfg *config, st *stats) float64 {
	request := absoluteGet(cfg)
	return runWindow(cfg, st, func(stop *atomic.Bool) {
		for !stop.Load() {
			start := time.Now()
			resp, err := oneRequest(cfg, request)
			if err == nil && resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("GET answered %d", resp.StatusCode)
			}
			if err != nil {
				st.fail(err)
				continue
			}
			st.record(start, 0)
		}
	})
}

type floodResult struct {
	Mode                     string           `json:"mode"`
	Rate                     float64          `json:"rate"`
	Seconds                  float64          `json:"seconds"`
	Offered                  int64            `json:"offered"`
	NotStarted               int64            `json:"not_started"`
	Statuses                 map[string]int64 `json:"statuses"`
	Errors                   map[string]int64 `json:"errors"`
	RefusedWithoutRetryAfter int64            `json:"refused_without_retry_after"`
	ServedP50Ms              *float64         `json:"served_p50_ms"`
	ServedP99Ms              *float64         `json:"served_p99_ms"`
	RefusedP99Ms             *float64         `json:"refused_p99_ms"`
	MaxMs                    float64          `json:"max_ms"`
}

type floodTally struct {
	mu       sync.Mutex
	statuses map[string]int64
	errors   map[string]int64
	noRetry  int64
	served   []float64
	refused  []float64
	maxMs    float64
}

func (t *floodTally) answer(resp *http.Response, ms float64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.statuses[strconv.Itoa(resp.StatusCode)]++
	if ms > t.maxMs {
		t.maxMs = ms
	}
	switch resp.StatusCode {
	case http.StatusTooManyRequests, http.StatusServiceUnavailable:
		t.refused = append(t.refused, ms)
		if resp.Header.Get("Retry-After") == "" {
			t.noRetry++
		}
	default:
		t.served = append(t.served, ms)
	}
}

func (t *floodTally) fail(err error, ms float64) {
	kind := "other"
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		kind = "timeout"
	} else if op, ok := err.(*net.OpError); ok {
		kind = op.Op
	} else if err == io.ErrUnexpectedEOF || err == io.EOF {
		kind = "eof"
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.errors[kind]++
	if ms > t.maxMs {
		t.maxMs = ms
	}
}

func modeFlood(cfg *config) floodResult {
	request := absoluteGet(cfg)
	tally := &floodTally{statuses: map[string]int64{}, errors: map[string]int64{}}
	sem := make(chan struct{}, cfg.maxOutstanding)
	var wg sync.WaitGroup
	var offered, notStarted int64
	fmt.Println("MEASURE")
	start := time.Now()
	tick := time.NewTicker(time.Millisecond)
	for now := range tick.C {
		elapsed := now.Sub(start)
		if elapsed >= cfg.duration {
			break
		}
		for due := int64(elapsed.Seconds() * cfg.rate); offered < due; {
			offered++
			select {
			case sem <- struct{}{}:
			default:
				notStarted++
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				began := time.Now()
				resp, err := oneRequest(cfg, request)
				ms := float64(time.Since(began).Microseconds()) / 1000.0
				if err != nil {
					tally.fail(err, ms)
					return
				}
				tally.answer(resp, ms)
			}()
		}
	}
	tick.Stop()
	seconds := time.Since(start).Seconds()
	fmt.Println("END")
	waitTimeout(&wg, cfg.timeout)
	tally.mu.Lock()
	defer tally.mu.Unlock()
	sort.Float64s(tally.served)
	sort.Float64s(tally.refused)
	return floodResult{
		Mode: "flood", Rate: cfg.rate, Seconds: seconds, Offered: offered, NotStarted: notStarted,
		Statuses: tally.statuses, Errors: tally.errors, RefusedWithoutRetryAfter: tally.noRetry,
		ServedP50Ms: percentile(tally.served, 0.50), ServedP99Ms: percentile(tally.served, 0.99),
		RefusedP99Ms: percentile(tally.refused, 0.99), MaxMs: tally.maxMs,
	}
}

func printJSON(v any) {
	out, _ := json.Marshal(v)
	fmt.Println(string(out))
}
