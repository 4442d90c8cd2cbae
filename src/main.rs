use kubenurse::agent::Agent;
use kubenurse::config::{describe_clap_error, Cli, Command, EXIT_USAGE};
use kubenurse::{demo, shutdown, telemetry};

fn main() {
    let cli = match Cli::try_parse_with_env(std::env::args_os(), |name| std::env::var(name).ok()) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => fail(&describe_clap_error(&e)),
    };
    // The demo prints a table; its agents only log what needs attention.
    let default_level = if cli.command.is_some() { "warn" } else { "info" };
    telemetry::init_logging(cli.config.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Some(Command::Demo(args)) => demo::run(args, cli.config).await,
            None => run(cli.config).await,
        }
    });
    std::process::exit(code);
}

async fn run(config: kubenurse::config::Config) -> i32 {
    let signals = match shutdown::Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("cannot wait for signals: {e}");
            return 1;
        }
    };
    let agent = match Agent::start(config).await {
        Ok(agent) => agent,
        Err(e) if e.is_config() => fail(&e.to_string()),
        Err(e) => {
            eprintln!("kubenurse cannot start: {e}");
            return 1;
        }
    };
    signals.first().await;
    agent.shutdown().await;
    0
}

fn fail(message: &str) -> ! {
    eprintln!("invalid configuration: {message}");
    std::process::exit(EXIT_USAGE);
}
