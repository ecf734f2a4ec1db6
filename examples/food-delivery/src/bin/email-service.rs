//! `email-service`: see `food_delivery::services::email`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    food_delivery::services::email::run(clap::Parser::parse()).await
}
