module outgate.dev/bench/loadgen

go 1.19
