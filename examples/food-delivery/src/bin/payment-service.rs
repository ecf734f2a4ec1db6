//! `payment-service`: see `food_delivery::services::payment`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    food_delivery::services::payment::run(clap::Parser::parse()).await
}
