//! `order-service`: see `food_delivery::services::order`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    food_delivery::services::order::run(clap::Parser::parse()).await
}
