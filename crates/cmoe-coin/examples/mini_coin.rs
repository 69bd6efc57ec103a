//! Writes a small Mini-CoIN build: `cargo run -p cmoe-coin --example mini_coin -- OUT_DIR`.

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "runs/mini-coin-example".into());
    let config = cmoe_coin::mini::MiniCoinConfig {
        train_per_task: 8,
        test_per_task: 8,
        ..Default::default()
    };
    if let Err(e) = cmoe_coin::mini::generate(&config, std::path::Path::new(&out), |task| {
        println!("{task}")
    }) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
