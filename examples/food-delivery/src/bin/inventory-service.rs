//! `inventory-service`: see `food_delivery::services::inventory`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    food_delivery::services::inventory::run(clap::Parser::parse()).await
}
