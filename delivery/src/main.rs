//! `delivery`: the delivery service binary (being built, issue 15).

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the delivery service is being built (issue 15)")
}
