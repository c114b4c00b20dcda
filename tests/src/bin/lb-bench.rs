//! `lockbroker-bench`, built in this package so that its tests find it as
//! `CARGO_BIN_EXE_lb-bench` (cargo builds it before they run).

fn main() {
    lockbroker_bench::main()
}
