//! `plipd`: see `plipd --help`.

/// Stack size of threads started without an explicit one (`RUST_MIN_STACK`), unless the
/// environment sets it: 256 MiB of address space, of which only the pages touched are memory.
///
/// lapin parses AMQP header tables on its own I/O thread (`lapin-io-loop`, started without a
/// stack size) with one level of recursion per nested table, and a table nested ~18,700 deep
/// fits in RabbitMQ's 128 KiB frame: on the default 2 MiB stack such a message aborts the whole
/// process before the daemon sees it, again after every restart while it is queued. The
/// project does not patch its dependencies, so the stack is made large enough for the deepest
/// table a frame can carry; the daemon then measures header tables without recursion and
/// refuses deep ones (`header_too_deep`) without copying them.
const DEFAULT_MIN_STACK: &str = "268435456";

fn main() -> std::process::ExitCode {
    // Before any thread starts: std reads the variable once, at the first spawn.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", DEFAULT_MIN_STACK);
    }
    plip_actors::cli::main()
}
