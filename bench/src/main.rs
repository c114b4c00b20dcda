//! `lockbroker-bench`: the benchmarks; the program is [`lockbroker_bench::main`].

fn main() {
    lockbroker_bench::main()
}
