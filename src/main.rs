//! The `appliance` command line. Thin: parse arguments, call the library, map results to
//! output and exit codes.

use appliance::daemon::status::Reply;
use appliance::host::netlink::Netlink;
use appliance::host::reconcile;
use appliance::model::config::{self, Config};
use appliance::model::key::PrivateKey;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes: 0 success / no changes; 1 error; 2 changes planned (dry-run); 64 usage error.
const EXIT_ERROR: u8 = 1;
const EXIT_CHANGES: u8 = 2;
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "appliance",
    version,
    about = "Extend a site's network into a public cloud: WireGuard links, kernel ECMP, iBGP.",
    after_help = "Exit codes: 0 ok or nothing to change, 1 error, 2 changes planned (--dry-run), 64 usage error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArgs {
    #[command(flatten)]
    file: ConfigFile,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(clap::Args)]
struct ConfigFile {
    /// Site config file (KDL).
    #[arg(
        short,
        long,
        env = "APPLIANCE_CONFIG",
        default_value = "/etc/appliance/config.kdl"
    )]
    config: PathBuf,
}

#[derive(clap::Args)]
struct KeyFile {
    /// This host's WireGuard private key (mode 0600), as written by `appliance genkey`.
    #[arg(
        short,
        long,
        env = "APPLIANCE_KEY_FILE",
        default_value = "/var/lib/appliance/private.key"
    )]
    key_file: PathBuf,
}

#[derive(clap::Args)]
struct HostArg {
    /// Which host of the config this is (default: $APPLIANCE_NODE, then the host name).
    #[arg(short, long, env = "APPLIANCE_NODE")]
    node: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new random private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin, print its public key, like `wg pubkey`.
    Pubkey,
    /// Validate a site config; print every error with file:line:col.
    Check {
        #[command(flatten)]
        args: ConfigArgs,
    },
    /// Bring this host's links, addresses, routes and sysctls in line with the config.
    Reconcile {
        #[command(flatten)]
        args: ConfigArgs,
        #[command(flatten)]
        host: HostArg,
        /// Print the plan and change nothing (needs no privileges).
        #[arg(long)]
        dry_run: bool,
    },
    /// Run the daemon: reconcile the host, run every tunnel link, follow link liveness and
    /// config reloads (SIGHUP, or `appliance reconcile` while it runs).
    Run {
        #[command(flatten)]
        file: ConfigFile,
        #[command(flatten)]
        host: HostArg,
        #[command(flatten)]
        key: KeyFile,
        /// Serve Prometheus `/metrics` on ADDR:PORT (e.g. 127.0.0.1:9477), instead of the site
        /// file's `metrics-port` on this host's own address.
        #[arg(long, value_name = "ADDR:PORT", env = "APPLIANCE_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        /// Take the site file, the host and its key from a user-data file instead (as the
        /// image does: a pool user-data picks the slot of this machine's address).
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        user_data: Option<PathBuf>,
        /// With a pool user-data: take this slot, whatever this machine's addresses are.
        #[arg(long, requires = "user_data")]
        slot: Option<u32>,
        /// Cores the datapath may use (default: the cores this process may run on). The link
        /// devices' tun queues together get one worker pair (transmit, receive) per core, each
        /// link at least one queue.
        #[arg(long, value_name = "N", env = "APPLIANCE_WORKERS")]
        workers: Option<std::num::NonZeroUsize>,
    },
    /// Show the running daemon's links: peer, endpoint, handshake age, last packet, bytes,
    /// live or dead.
    Status {
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Stand-alone route reflector for the shared rr-bench harness (bench/bgp); reads RR_IP,
    /// PORT, ASN, CLIENTS_FILE, LISTENER_IP and RUN_DIR from the environment.
    #[command(hide = true)]
    BgpReflector,
    /// Print what appliance owns on this host (or, with --desired, what the config wants) as
    /// the state model the planner compares.
    State {
        #[command(flatten)]
        args: ConfigArgs,
        #[command(flatten)]
        host: HostArg,
        /// The state the config wants instead of the state the kernel has.
        #[arg(long)]
        desired: bool,
    },
    /// The image's PID 1: find the config (kernel command line, cidata drive, metadata
    /// service, cache), apply it and supervise `appliance run`. As the initramfs `/init` it is
    /// stage 1 (verity root, switch_root).
    Init,
    /// Start the workload from a spec file (JSON) in namespaces of its own: what the image's
    /// PID 1 runs for the site's jobs. Exits with the job's status.
    #[command(hide = true)]
    WorkloadExec {
        /// The spec file init wrote.
        spec: std::path::PathBuf,
        /// Run COMMAND inside the running workload whose ns-init has this PID (the drain
        /// command) instead of starting it.
        #[arg(long, requires = "command")]
        join: Option<i32>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// The bootable image's A/B slots (run on a machine booted from the image).
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Key every slot of an instance pool and write the one user-data all its instances boot:
    /// DIR/site.kdl (the site file with the slots' public keys: deploy it to the gateways),
    /// DIR/POOL.user-data (or .user-data.gz when gzip is needed to fit Exoscale's 32 KiB),
    /// DIR/POOL.secret (keep it: re-running with it changes nothing). Prints the exo command.
    Provision {
        #[command(flatten)]
        file: ConfigFile,
        /// The pool block's name.
        #[arg(long)]
        pool: String,
        /// Where the files go (created 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// For the printed exo command: zone, template, instance type, private network and
        /// security group.
        #[arg(long, default_value = "ch-gva-2")]
        zone: String,
        #[arg(long, default_value = concat!("appliance-", env!("CARGO_PKG_VERSION")))]
        template: String,
        #[arg(long, default_value = "standard.medium")]
        instance_type: String,
        #[arg(long, default_value = "appliance-private")]
        private_network: String,
        #[arg(long, default_value = "appliance-nodes")]
        security_group: String,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Take a gateway out of service: set `drain #true` in its block of the site file and hand
    /// the file to the daemon running here, if any. Its paths leave the site routers, the
    /// nodes route around it (their probes tell them), its tunnels and sessions stay up, and
    /// running connections move to the other gateways. Survives restarts (it is in the file).
    /// Run on a node (HOST = the node), it drains the node: new connections from the tunnels
    /// are refused at once, its prefixes withdrawn once its tunnels are quiet. With HOST a node
    /// anywhere else (a gateway), it sets `drain` for the node in the site file (a pool slot:
    /// the pool's `drain` list) and reloads the daemon here: the gateway's probes ask the node
    /// to drain, which runs its workload's drain command first.
    Drain {
        #[command(flatten)]
        file: ConfigFile,
        /// The gateway's or node's name.
        host: String,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Put a drained gateway back in service (removes `drain` from its block), or end a node's
    /// drain (run on the node, or on a gateway: removes the node's `drain` from the site file).
    Undrain {
        #[command(flatten)]
        file: ConfigFile,
        host: String,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Rotate this host's WireGuard key without cutting its tunnels. Run on the host: writes
    /// a new key beside the key file (KEYFILE.next, mode 0600), lists its public key as
    /// `next-public-key` in the host's block of the site file and hands the file to the
    /// daemon running here. Deploy the file to the host's peers and reload them: each peer
    /// then takes handshakes signed with either key and says so in its probes, and the host
    /// moves its links to the new key one at a time, each once its live peers say so, while
    /// the others carry the traffic (`appliance status` shows how far; a link whose peers do
    /// not complete the handshake within 5 s goes back and is retried every 30 s). Then run it
    /// again with --finish.
    RotateKey {
        #[command(flatten)]
        file: ConfigFile,
        /// The host (a gateway or a node listed by name; a pool's keys come from its secret:
        /// provision the pool again with a new one).
        host: String,
        #[command(flatten)]
        key: KeyFile,
        /// Retire the old key: the next key becomes the host's `public-key` and moves into the
        /// key file. Refused until the daemon here runs every link on the next key. Deploy
        /// the file to the peers and reload them: from then on the old key is refused.
        #[arg(long)]
        finish: bool,
        /// With --finish: retire the old key even though links still run on it (they move to
        /// the new key, which peers that already dropped the old one require).
        #[arg(long, requires = "finish")]
        force: bool,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the completion script for SHELL, generated from this command line
    /// (bash: `source <(appliance completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page appliance(1), generated from this command line; with --dir, write
    /// it and one page per subcommand (appliance-reconcile.1, ...) into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Write IMAGE (a disk image built by images/build.sh, as a file or a block device) into
    /// the inactive slot, verify it against its root hash, and make the next boot (only the
    /// next one) try it; it becomes the default once it comes up healthy.
    Install {
        /// The image: appliance.raw, a disk holding it (e.g. /dev/vdb), or the raw image's
        /// http:// URL (gzip or not; needs --root-hash).
        image: String,
        /// The root hash the image must have (root-hash-A of its build).
        #[arg(long)]
        root_hash: Option<String>,
    },
}

fn main() -> ExitCode {
    // The kernel runs the initramfs `/init` with no arguments: that is stage 1 of the image.
    if appliance::image::is_stage1() {
        appliance::image::stage1();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match &cli.command {
        Command::Run { .. } => appliance::host::logging::init_with_defaults("info", "info"),
        _ => appliance::host::logging::init(),
    }
    match cli.command {
        Command::Init => appliance::image::stage2(),
        Command::WorkloadExec {
            spec,
            join,
            command,
        } => workload_exec(&spec, join, &command),
        Command::Image {
            command: ImageCommand::Install { image, root_hash },
        } => image_install(&image, root_hash.as_deref()),
        Command::Genkey => {
            println!(
                "{}",
                appliance::model::key::PrivateKey::generate().to_base64()
            );
            ExitCode::SUCCESS
        }
        Command::Pubkey => pubkey(),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "appliance",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { dir } => man(dir),
        Command::Drain { file, host, output } => drain(&file.config, &host, true, output),
        Command::RotateKey {
            file,
            host,
            key: KeyFile { key_file },
            finish,
            force,
            output,
        } => {
            let r = if finish {
                rotate_finish(&file.config, &host, &key_file, force)
            } else {
                rotate_begin(&file.config, &host, &key_file)
            };
            match r {
                Ok(done) => {
                    match output {
                        Output::Json => println!("{}", done.json),
                        Output::Text => println!("{}", done.text),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    fail(output, &e);
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Undrain { file, host, output } => drain(&file.config, &host, false, output),
        Command::Provision {
            file,
            pool,
            out,
            zone,
            template,
            instance_type,
            private_network,
            security_group,
            output,
        } => provision(
            &file.config,
            &pool,
            &out,
            &[
                ("zone", zone),
                ("template", template),
                ("instance-type", instance_type),
                ("private-network", private_network),
                ("security-group", security_group),
            ],
            output,
        ),
        Command::Check { args } => check(&args),
        Command::Run {
            file,
            host,
            key: KeyFile { key_file },
            metrics,
            user_data,
            slot,
            workers,
        } => match user_data {
            None => run_cmd(file.config, host.node, key_file, metrics, workers),
            Some(u) => match from_user_data(&u, host.node.as_deref(), slot) {
                Ok((config, host, key)) => run_cmd(
                    config,
                    Some(host),
                    key.unwrap_or(key_file),
                    metrics,
                    workers,
                ),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_ERROR)
                }
            },
        },
        Command::Status { output } => status_cmd(output),
        Command::BgpReflector => bench_reflector(),
        Command::Reconcile {
            args,
            host,
            dry_run,
        } => reconcile_cmd(&args, host.node, dry_run),
        Command::State {
            args,
            host,
            desired,
        } => state_cmd(&args, host.node, desired),
    }
}

/// Read and validate the config, printing diagnostics on failure.
fn load(args: &ConfigArgs) -> Result<Config, ExitCode> {
    let file = args.file.config.display().to_string();
    let text = match std::fs::read(&args.file.config)
        .map_err(|e| format!("cannot read config {file}: {e}"))
        .and_then(|b| config::text_of(&file, b))
    {
        Ok(t) => t,
        Err(e) => {
            fail(args.output, &e);
            return Err(ExitCode::from(EXIT_ERROR));
        }
    };
    config::parse(&file, &text).map_err(|report| {
        match args.output {
            Output::Text => eprint!("{}", report.render()),
            Output::Json => println!(
                "{}",
                serde_json::json!({ "ok": false, "errors": report.located() })
            ),
        }
        ExitCode::from(EXIT_ERROR)
    })
}

fn fail(output: Output, msg: &str) {
    match output {
        Output::Text => eprintln!("error: {msg}"),
        Output::Json => println!("{}", serde_json::json!({ "ok": false, "error": msg })),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(EXIT_ERROR)
        })
}

/// Resolve a user-data file as the image does (this machine's addresses choose a pool slot):
/// the site file and the key go to /run/appliance/HOST.{kdl,key} (0600), for `run`.
fn from_user_data(
    path: &std::path::Path,
    node: Option<&str>,
    slot: Option<u32>,
) -> Result<(PathBuf, String, Option<PathBuf>), String> {
    use appliance::image::userdata;
    let raw =
        std::fs::read(path).map_err(|e| format!("error: cannot read {}: {e}", path.display()))?;
    let text = userdata::decode(&raw).map_err(|e| format!("error: {}: {e}", path.display()))?;
    let addresses: Vec<std::net::IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(|e| format!("error: cannot list this machine's addresses: {e}"))?
        .filter_map(|i| {
            let a = i.address?;
            a.as_sockaddr_in()
                .map(|v| std::net::IpAddr::V4(v.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v| std::net::IpAddr::V6(v.ip())))
        })
        .collect();
    let who = userdata::Who {
        host: node,
        addresses: &addresses,
        slot,
    };
    let a = userdata::validate(&path.display().to_string(), &text, &who).map_err(|r| r.render())?;
    let dir = std::path::Path::new("/run/appliance");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("error: cannot create {}: {e}", dir.display()))?;
    }
    let config = dir.join(format!("{}.kdl", a.host));
    write_if_changed(&config, a.site_text.as_bytes(), 0o600)
        .map_err(|e| format!("error: cannot write {}: {e}", config.display()))?;
    let key = match &a.private_key {
        Some(k) => {
            let p = dir.join(format!("{}.key", a.host));
            write_if_changed(&p, format!("{}\n", k.to_base64()).as_bytes(), 0o600)
                .map_err(|e| format!("error: cannot write {}: {e}", p.display()))?;
            Some(p)
        }
        None => None,
    };
    eprintln!(
        "{}: this machine is {} ({}), hash {}",
        path.display(),
        a.host,
        a.role,
        a.sha256
    );
    Ok((config, a.host, key))
}

/// Write `bytes` to `path` with `mode`, replacing it only when it differs (a re-run that
/// changes nothing touches nothing). Returns whether it wrote.
fn write_if_changed(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(false);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename itself on disk too (a key file swapped by `rotate-key --finish`).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(true)
}

fn provision(
    config: &std::path::Path,
    pool: &str,
    out: &std::path::Path,
    exo: &[(&str, String)],
    output: Output,
) -> ExitCode {
    use base64::Engine as _;
    use std::os::unix::fs::DirBuilderExt;
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_ERROR)
    };
    let text = match std::fs::read(config)
        .map_err(|e| format!("cannot read {}: {e}", config.display()))
        .and_then(|b| config::text_of(&config.display().to_string(), b))
    {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
    {
        return fail(format!("cannot create {}: {e}", out.display()));
    }
    // The pool secret: kept in DIR and reused, so a re-run derives the same keys.
    let secret_path = out.join(format!("{pool}.secret"));
    let secret: [u8; 32] = match std::fs::read_to_string(&secret_path) {
        Ok(s) => match appliance::model::key::decode_key(s.trim()) {
            Ok(k) => k,
            Err(e) => return fail(format!("{}: {e}", secret_path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            appliance::model::key::PrivateKey::generate().0
        }
        Err(e) => return fail(format!("cannot read {}: {e}", secret_path.display())),
    };
    let p = match appliance::provision::provision(
        &config.display().to_string(),
        &text,
        pool,
        &secret,
    ) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let plain = out.join(format!("{pool}.user-data"));
    let gz = out.join(format!("{pool}.user-data.gz"));
    let site = out.join("site.kdl");
    let secret_b64 = format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(secret)
    );
    let mut files = vec![
        (secret_path.clone(), secret_b64.into_bytes(), 0o600),
        (site.clone(), p.site_text.clone().into_bytes(), 0o644),
        (plain.clone(), p.user_data.clone().into_bytes(), 0o600),
    ];
    if let Some(z) = &p.user_data_gz {
        files.push((gz.clone(), z.clone(), 0o600));
    } else {
        let _ = std::fs::remove_file(&gz);
    }
    let mut written = vec![];
    for (path, bytes, mode) in &files {
        match write_if_changed(path, bytes, *mode) {
            Ok(true) => written.push(path.display().to_string()),
            Ok(false) => {}
            Err(e) => return fail(format!("cannot write {}: {e}", path.display())),
        }
    }
    let cloud_init = if p.user_data_gz.is_some() {
        &gz
    } else {
        &plain
    };
    let arg = |k: &str| {
        exo.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let command = format!(
        "exo compute instance-pool create {pool} --size {} --zone {} --template {} --template-visibility private --instance-type {} --private-network {} --security-group {} --public-ip none --cloud-init {}",
        p.slots - p.own_key.len() as u32,
        arg("zone"),
        arg("template"),
        arg("instance-type"),
        arg("private-network"),
        arg("security-group"),
        cloud_init.display()
    );
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "provisioned": p,
                "written": written,
                "user_data": cloud_init.display().to_string(),
                "site_file": site.display().to_string(),
                "command": command,
            })
        ),
        Output::Text => {
            println!(
                "pool {pool}: {} slots, {} key(s) added, {} kept{}; {} slot(s) validated as the image will (dhcp-start {} + slot)",
                p.slots,
                p.added.len(),
                p.slots as usize - p.added.len() - p.own_key.len(),
                if p.own_key.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", slot(s) {:?} keyed by hand (not for the pool's instances)",
                        p.own_key
                    )
                },
                p.validated,
                p.dhcp_start
            );
            println!(
                "user-data: {} ({} bytes of base64, limit {})",
                cloud_init.display(),
                p.user_data_b64_bytes,
                appliance::provision::EXOSCALE_LIMIT_B64
            );
            if !p.own_key.is_empty() {
                println!(
                    "warning: slots keyed by hand lie in the DHCP range: an instance that leases one is refused (move dhcp-start past them, or drop their keys)"
                );
            }
            if written.is_empty() {
                println!("nothing changed");
            } else {
                println!("wrote: {}", written.join(", "));
            }
            println!(
                "deploy {} to the gateways (appliance reconcile, or SIGHUP), then:\n  {command}",
                site.display()
            );
        }
    }
    ExitCode::SUCCESS
}

/// A site file read and parsed, with its text (for an edit).
fn read_site(path: &std::path::Path) -> Result<(String, Config), String> {
    let name = path.display().to_string();
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read {name}: {e}"))
        .and_then(|b| config::text_of(&name, b))?;
    let cfg = config::parse(&name, &text).map_err(|r| r.render())?;
    Ok((text, cfg))
}

/// Write an edited site file (atomically, keeping its mode) once the whole of it checks and
/// `took` holds of it. Returns whether the file changed.
fn write_site(
    path: &std::path::Path,
    new: &str,
    took: impl Fn(&Config) -> bool,
) -> Result<bool, String> {
    let name = path.display().to_string();
    match config::parse(&name, new) {
        Ok(c) if took(&c) => {}
        Ok(_) => return Err(format!("{name}: the edit did not take; edit it by hand")),
        Err(r) => return Err(r.render()),
    }
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644)
    };
    write_if_changed(path, new.as_bytes(), mode).map_err(|e| format!("cannot write {name}: {e}"))
}

/// Hand the site file to the daemon running in this network namespace, if one does: its
/// reply, or None when no daemon runs here.
fn reload_here(path: &std::path::Path) -> Result<Option<String>, String> {
    let rt = runtime().map_err(|_| "cannot start the async runtime".to_string())?;
    let config = std::fs::canonicalize(path).unwrap_or(path.to_path_buf());
    let req = appliance::daemon::control::Request::Reload {
        config: Some(config.display().to_string()),
    };
    match rt.block_on(appliance::daemon::control::request(&req)) {
        Ok(r) if r.ok => Ok(Some(r.message.unwrap_or_default())),
        Ok(r) => Err(format!(
            "the daemon refused the file: {}",
            r.error.unwrap_or_default()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot reach the daemon: {e}")),
    }
}

/// `drain` / `undrain`: edit the gateway's block in the site file (formatting and comments
/// kept), check the result as a whole, write it atomically, then hand it to a daemon running
/// in this network namespace.
fn drain(path: &std::path::Path, host: &str, on: bool, output: Output) -> ExitCode {
    if let Some(code) = drain_this_node(host, on, output) {
        return code;
    }
    let name = path.display().to_string();
    let err = |msg: String| {
        fail(output, &msg);
        ExitCode::from(EXIT_ERROR)
    };
    let (text, cfg) = match read_site(path) {
        Ok(x) => x,
        Err(e) => return err(e),
    };
    if let Some(n) = cfg.nodes.iter().find(|n| n.name == host) {
        return drain_node_from_gateway(path, &text, &cfg, n, on, output);
    }
    let Some(g) = cfg.gateways.iter().find(|g| g.name == host) else {
        return err(format!(
            "{name}: no gateway or node {host:?} (gateways: {})",
            cfg.gateways
                .iter()
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let changed = g.drain != on;
    if changed {
        let edited = appliance::model::edit::set_field(
            &text,
            "gateway",
            host,
            "drain",
            on.then_some("#true"),
        )
        .map_err(|e| format!("{name}: {e}"))
        .and_then(|new| {
            write_site(path, &new, |c| {
                c.gateways.iter().any(|g| g.name == host && g.drain == on)
            })
        });
        if let Err(e) = edited {
            return err(e);
        }
    }
    // A daemon running here picks the file up now; elsewhere, deploy it and reload.
    drain_reload_and_say(path, host, host, on, changed, None, output)
}

/// The end of a drain or undrain that edited the site file: reload the daemon running here (if
/// any) and say what was done; `deploy_to` names where the file must go when no daemon runs
/// here; `note` is a line more for the text output.
fn drain_reload_and_say(
    path: &std::path::Path,
    host: &str,
    deploy_to: &str,
    on: bool,
    changed: bool,
    note: Option<String>,
    output: Output,
) -> ExitCode {
    let name = path.display().to_string();
    let daemon = match reload_here(path) {
        Ok(d) => d,
        Err(e) => {
            fail(output, &e);
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "ok": true, "host": host, "drained": on, "changed": changed, "daemon": daemon })
        ),
        Output::Text => {
            println!(
                "{host}: {}{} in {name}",
                if changed { "now " } else { "already " },
                if on { "drained" } else { "in service" }
            );
            if let Some(n) = note {
                println!("{n}");
            }
            match daemon {
                Some(m) => println!("daemon: {m}"),
                None => println!("no daemon runs here: deploy {name} to {deploy_to} and reload (`appliance reconcile -c FILE` or SIGHUP)"),
            }
        }
    }
    ExitCode::SUCCESS
}

/// `appliance drain NODE` where a gateway runs (or on the site file before it is deployed):
/// `drain #true` in the node's block (a pool slot: its index in the pool's `drain` list). The
/// gateways' probes then ask the node to drain: its workload's drain command runs, and once
/// the workload is idle the node withdraws its prefixes.
fn drain_node_from_gateway(
    path: &std::path::Path,
    text: &str,
    cfg: &Config,
    node: &config::Node,
    on: bool,
    output: Output,
) -> ExitCode {
    let name = path.display().to_string();
    let host = node.name.clone();
    let changed = node.drain != on;
    if changed {
        let edited = match &node.pool {
            None => appliance::model::edit::set_field(
                text,
                "node",
                &host,
                "drain",
                on.then_some("#true"),
            ),
            Some(pool) => {
                let p = cfg
                    .pools
                    .iter()
                    .find(|p| &p.name == pool)
                    .expect("a slot's pool");
                let slot: u32 = host
                    .rsplit('-')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .expect("slot names end in their index");
                let mut set = p.drain.clone();
                if on {
                    set.insert(slot);
                } else {
                    set.remove(&slot);
                }
                let list = set.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
                appliance::model::edit::set_field(
                    text,
                    "pool",
                    pool,
                    "drain",
                    (!set.is_empty()).then_some(list.as_str()),
                )
            }
        }
        .map_err(|e| format!("{name}: {e}"))
        .and_then(|new| {
            write_site(path, &new, |c| {
                c.nodes.iter().any(|n| n.name == host && n.drain == on)
            })
        });
        if let Err(e) = edited {
            fail(output, &e);
            return ExitCode::from(EXIT_ERROR);
        }
    }
    let note = on.then(|| format!("the gateways that read this file ask {host} to drain: its workload's drain command runs, then it withdraws its prefixes once idle"));
    drain_reload_and_say(path, &host, "the gateways", on, changed, note, output)
}

/// What a `rotate-key` step did, for either output.
struct Said {
    text: String,
    json: serde_json::Value,
}

/// The host a key is rotated for: a gateway or a node listed by name.
fn rotatable(cfg: &Config, name: &str, host: &str) -> Result<&'static str, String> {
    if cfg.gateways.iter().any(|g| g.name == host) {
        return Ok("gateway");
    }
    match cfg.nodes.iter().find(|n| n.name == host) {
        Some(n) if n.pool.is_some() => Err(format!(
            "{host} is a slot of pool {:?}: its key comes from the pool secret; provision the pool again with a new secret and roll it",
            n.pool.as_deref().unwrap_or("")
        )),
        Some(_) => Ok("node"),
        None => Err(format!(
            "{name}: no gateway or node {host:?}{}",
            match cfg.role_of(host) {
                Some(role) => format!(" ({host} is a {role}: it has no key)"),
                None => String::new(),
            }
        )),
    }
}

/// Write a private key file (0600), replacing any file there atomically.
fn write_key(path: &std::path::Path, key: &PrivateKey) -> Result<(), String> {
    write_if_changed(path, format!("{}\n", key.to_base64()).as_bytes(), 0o600)
        .map(|_| ())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `rotate-key HOST`: a next key beside the key file, listed in the site file.
fn rotate_begin(
    path: &std::path::Path,
    host: &str,
    key_file: &std::path::Path,
) -> Result<Said, String> {
    use appliance::host::keyfile::load_private_key;
    let name = path.display().to_string();
    let (text, cfg) = read_site(path)?;
    let kind = rotatable(&cfg, &name, host)?;
    let current = load_private_key(key_file).map_err(|e| e.to_string())?;
    if cfg.public_key_of(host) != Some(current.public()) {
        return Err(format!(
            "{} holds {}, but {name} lists {} for {host}: run this on {host}, with its key file",
            key_file.display(),
            current.public(),
            cfg.public_key_of(host)
                .map(|k| k.to_string())
                .unwrap_or_default()
        ));
    }
    let next_file = appliance::daemon::next_key_file(key_file);
    let held = match next_file.exists() {
        true => Some(load_private_key(&next_file).map_err(|e| e.to_string())?),
        false => None,
    };
    // A next key file holding the current key is left from a finished rotation.
    let held = held.filter(|k| k.public() != current.public());
    // Checked before anything is written: a refusal leaves no unlisted key behind.
    if let Some(listed) = cfg.next_public_key_of(host) {
        if held.as_ref().map(|k| k.public()) != Some(listed) {
            return Err(format!(
                "{name} lists next key {listed} for {host}, but {} {}: remove the entry (or restore the file)",
                next_file.display(),
                match &held {
                    Some(k) => format!("holds {}", k.public()),
                    None => "does not exist".to_string(),
                }
            ));
        }
    }
    let next = match held {
        Some(k) => k,
        None => {
            let k = PrivateKey::generate();
            write_key(&next_file, &k)?;
            k
        }
    };
    let np = next.public();
    let new = appliance::model::edit::set_field(
        &text,
        kind,
        host,
        "next-public-key",
        Some(&appliance::model::edit::quoted(&np.to_string())),
    )
    .map_err(|e| format!("{name}: {e}"))?;
    let changed = write_site(path, &new, |c| c.next_public_key_of(host) == Some(np))?;
    let daemon = reload_here(path)?;
    Ok(Said {
        json: serde_json::json!({
            "ok": true, "host": host, "public_key": current.public().to_string(),
            "next_public_key": np.to_string(), "next_key_file": next_file.display().to_string(),
            "changed": changed, "daemon": daemon,
        }),
        text: format!(
            "{host}: next key {np} {} {name}, private half in {}\n{}\nthen: deploy {name} to {host}'s peers and reload them (`appliance reconcile -c FILE` or SIGHUP); {host} moves its links to the new key one at a time (`appliance status`), then `appliance rotate-key {host} --finish`",
            if changed { "listed in" } else { "already in" },
            next_file.display(),
            match &daemon {
                Some(m) => format!("daemon: {m}"),
                None => format!("no daemon runs here: {host}'s daemon starts moving its links when it loads {name}"),
            }
        ),
    })
}

/// `rotate-key HOST --finish`: the next key becomes the key.
fn rotate_finish(
    path: &std::path::Path,
    host: &str,
    key_file: &std::path::Path,
    force: bool,
) -> Result<Said, String> {
    use appliance::daemon::control::{request, Request};
    use appliance::host::keyfile::load_private_key;
    let name = path.display().to_string();
    let (text, cfg) = read_site(path)?;
    let kind = rotatable(&cfg, &name, host)?;
    let next_file = appliance::daemon::next_key_file(key_file);
    let Some(np) = cfg.next_public_key_of(host) else {
        // A finish interrupted after the site file was written: complete the key files.
        let listed = cfg
            .public_key_of(host)
            .expect("a gateway or node has a key");
        if let Ok(k) = load_private_key(&next_file) {
            if k.public() == listed {
                write_key(key_file, &k)?;
                std::fs::remove_file(&next_file)
                    .map_err(|e| format!("cannot remove {}: {e}", next_file.display()))?;
                let daemon = reload_here(path)?;
                return Ok(Said {
                    json: serde_json::json!({
                        "ok": true, "host": host, "public_key": listed.to_string(),
                        "completed": true, "daemon": daemon,
                    }),
                    text: format!(
                        "{host}: an interrupted finish completed: {} now holds {listed}",
                        key_file.display()
                    ),
                });
            }
        }
        return Err(format!(
            "{name} lists no next key for {host}: nothing to finish (start with `appliance rotate-key {host}`)"
        ));
    };
    let old = cfg
        .public_key_of(host)
        .expect("a gateway or node has a key");
    let held = [key_file, next_file.as_path()]
        .into_iter()
        .filter_map(|p| load_private_key(p).ok())
        .find(|k| k.public() == np)
        .ok_or_else(|| {
            format!(
                "neither {} nor {} holds {host}'s next key {np}: run this on {host}",
                key_file.display(),
                next_file.display()
            )
        })?;
    if !force {
        let rt = runtime().map_err(|_| "cannot start the async runtime".to_string())?;
        match rt.block_on(request(&Request::Status)) {
            Ok(r) => {
                let k = r
                    .status
                    .filter(|s| s.host == host)
                    .and_then(|s| s.key)
                    .ok_or_else(|| {
                        format!("the daemon here is not {host}'s: run this on {host}")
                    })?;
                if !k.rotated() {
                    return Err(format!(
                        "{}/{} of {host}'s links run on the next key{}: wait until all have moved (`appliance status`), or --force",
                        k.links_on_target,
                        k.links,
                        k.moving.map(|d| format!(" (moving {d})")).unwrap_or_default()
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot reach the daemon: {e}")),
        }
    }
    // The site file first: the daemon takes whichever of the two files holds the listed key,
    // so every state in between loads.
    let new = appliance::model::edit::set_field(
        &text,
        kind,
        host,
        "public-key",
        Some(&appliance::model::edit::quoted(&np.to_string())),
    )
    .and_then(|t| appliance::model::edit::set_field(&t, kind, host, "next-public-key", None))
    .map_err(|e| format!("{name}: {e}"))?;
    write_site(path, &new, |c| {
        c.public_key_of(host) == Some(np) && c.next_public_key_of(host).is_none()
    })?;
    write_key(key_file, &held)?;
    if next_file.exists() {
        std::fs::remove_file(&next_file)
            .map_err(|e| format!("cannot remove {}: {e}", next_file.display()))?;
    }
    let daemon = reload_here(path)?;
    Ok(Said {
        json: serde_json::json!({
            "ok": true, "host": host, "public_key": np.to_string(), "retired": old.to_string(),
            "daemon": daemon,
        }),
        text: format!(
            "{host}: public key now {np} in {name} and {}; {old} retired\n{}\nthen: deploy {name} to {host}'s peers and reload them: from then on they refuse the old key",
            key_file.display(),
            match &daemon {
                Some(m) => format!("daemon: {m}"),
                None => "no daemon runs here".to_string(),
            }
        ),
    })
}

/// When the daemon running here is node `host`: drain it (or end its drain) at run time. A
/// node's site file is its user-data, so its drain is not written anywhere: it ends with the
/// node (evicted) or with `undrain`.
fn drain_this_node(host: &str, on: bool, output: Output) -> Option<ExitCode> {
    use appliance::daemon::control::{request, Request};
    let rt = runtime().ok()?;
    let status = rt.block_on(request(&Request::Status)).ok()?.status?;
    if status.host != host || status.role != config::Role::Node {
        return None;
    }
    let reply = match rt.block_on(request(&Request::Drain { on })) {
        Ok(r) => r,
        Err(e) => {
            fail(output, &format!("cannot reach the daemon: {e}"));
            return Some(ExitCode::from(EXIT_ERROR));
        }
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string(&reply).expect("a reply serialises")
        ),
        Output::Text if reply.ok => println!("{}", reply.message.as_deref().unwrap_or("")),
        Output::Text => eprintln!("error: {}", reply.error.as_deref().unwrap_or("")),
    }
    Some(if reply.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ERROR)
    })
}

fn man(dir: Option<PathBuf>) -> ExitCode {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let r = match &dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
        Some(d) => std::fs::create_dir_all(d).and_then(|()| clap_mangen::generate_to(cmd, d)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: writing the man page{}: {e}",
                dir.map(|d| format!("s into {}", d.display()))
                    .unwrap_or_default()
            );
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run_cmd(
    config: PathBuf,
    node: Option<String>,
    key_file: PathBuf,
    metrics: Option<std::net::SocketAddr>,
    workers: Option<std::num::NonZeroUsize>,
) -> ExitCode {
    let Some(host) = host_name(node) else {
        eprintln!("error: cannot tell which host this is: pass --node NAME or set APPLIANCE_NODE");
        return ExitCode::from(EXIT_USAGE);
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let opts = appliance::daemon::Options {
        config,
        host,
        key_file,
        metrics,
        workers,
    };
    match rt.block_on(appliance::daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn bench_reflector() -> ExitCode {
    let env = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
    let run = || -> Result<(), String> {
        let ip: std::net::IpAddr = env("RR_IP")?.parse().map_err(|e| format!("RR_IP: {e}"))?;
        let port: u16 = env("PORT")?.parse().map_err(|e| format!("PORT: {e}"))?;
        let asn: u32 = env("ASN")?.parse().map_err(|e| format!("ASN: {e}"))?;
        let listener: std::net::IpAddr = env("LISTENER_IP")?
            .parse()
            .map_err(|e| format!("LISTENER_IP: {e}"))?;
        let text = std::fs::read_to_string(env("CLIENTS_FILE")?).map_err(|e| e.to_string())?;
        let mut clients = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut f = line.split_whitespace();
            let (Some(a), Some(b)) = (f.next(), f.next()) else {
                return Err(format!("bad clients line {line:?}"));
            };
            clients.push((
                a.parse().map_err(|e| format!("{a}: {e}"))?,
                b.parse().map_err(|e| format!("{b}: {e}"))?,
            ));
        }
        let count = std::path::PathBuf::from(env("RUN_DIR")?).join("rr.count");
        let rt = runtime().map_err(|_| "runtime".to_string())?;
        rt.block_on(appliance::bgp::speaker::bench_reflector(
            std::net::SocketAddr::new(ip, port),
            asn,
            clients,
            listener,
            count,
        ))
        .map_err(|e| e.to_string())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn status_cmd(output: Output) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let reply = rt.block_on(appliance::daemon::control::request(
        &appliance::daemon::control::Request::Status,
    ));
    let status = match reply {
        Ok(Reply {
            status: Some(s), ..
        }) => s,
        Ok(r) => {
            fail(
                output,
                r.error.as_deref().unwrap_or("the daemon sent no status"),
            );
            return ExitCode::from(EXIT_ERROR);
        }
        Err(e) => {
            fail(output, &e.to_string());
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status).expect("json")),
        Output::Text => print!("{}", status.render()),
    }
    ExitCode::SUCCESS
}

fn pubkey() -> ExitCode {
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut text) {
        eprintln!("error: cannot read stdin: {e}");
        return ExitCode::from(EXIT_ERROR);
    }
    match text.trim().parse::<appliance::model::key::PrivateKey>() {
        Ok(k) => {
            println!("{}", k.public());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: stdin is not a private key: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn check(args: &ConfigArgs) -> ExitCode {
    let cfg = match load(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match args.output {
        Output::Text => println!(
            "{}: ok: site {:?}, {} gateway(s), {} node(s), {} relay(s), {} link(s) per pair",
            args.file.config.display(),
            cfg.site.name,
            cfg.gateways.len(),
            cfg.nodes.len(),
            cfg.relays.len(),
            cfg.site.links
        ),
        Output::Json => println!("{}", serde_json::json!({ "ok": true, "config": cfg })),
    }
    ExitCode::SUCCESS
}

/// This host's name in the config: --node / $APPLIANCE_NODE, else the kernel host name.
fn host_name(node: Option<String>) -> Option<String> {
    node.or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
    })
}

/// Config, host name and a current-thread runtime: what every host command starts from.
fn host_setup(
    args: &ConfigArgs,
    node: Option<String>,
) -> Result<(Config, String, tokio::runtime::Runtime), ExitCode> {
    let cfg = load(args)?;
    let Some(host) = host_name(node) else {
        fail(
            args.output,
            "cannot tell which host this is: pass --node NAME or set APPLIANCE_NODE",
        );
        return Err(ExitCode::from(EXIT_USAGE));
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Ok((cfg, host, rt)),
        Err(e) => {
            fail(args.output, &format!("cannot start the runtime: {e}"));
            Err(ExitCode::from(EXIT_ERROR))
        }
    }
}

fn state_cmd(args: &ConfigArgs, node: Option<String>, want_desired: bool) -> ExitCode {
    let (cfg, host, rt) = match host_setup(args, node) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let want = match appliance::intent::one_shot(&cfg, &host, &[]) {
        Ok(i) => i.kernel,
        Err(e) => {
            fail(args.output, &e.to_string());
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let state = if want_desired {
        want
    } else {
        let observed = rt.block_on(async {
            let nl = Netlink::connect()?;
            nl.observe(&want).await
        });
        match observed {
            Ok(s) => s,
            Err(e) => {
                fail(args.output, &format!("reading the host state failed: {e}"));
                return ExitCode::from(EXIT_ERROR);
            }
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&state).expect("state serialises")
    );
    ExitCode::SUCCESS
}

fn reconcile_cmd(args: &ConfigArgs, node: Option<String>, dry_run: bool) -> ExitCode {
    let (cfg, host, rt) = match host_setup(args, node) {
        Ok(x) => x,
        Err(code) => return code,
    };
    rt.block_on(async {
        let nl = match Netlink::connect() {
            Ok(nl) => nl,
            Err(e) => {
                fail(args.output, &format!("cannot open netlink: {e}"));
                return ExitCode::from(EXIT_ERROR);
            }
        };
        if !dry_run {
            // A running daemon owns the links: hand it the config instead of racing it.
            let config =
                std::fs::canonicalize(&args.file.config).unwrap_or(args.file.config.clone());
            let req = appliance::daemon::control::Request::Reload {
                config: Some(config.display().to_string()),
            };
            match appliance::daemon::control::request(&req).await {
                Ok(reply) => {
                    let ok = reply.ok;
                    match args.output {
                        Output::Json => println!(
                            "{}",
                            serde_json::to_string(&reply).expect("a reply serialises")
                        ),
                        Output::Text if ok => {
                            println!("daemon: {}", reply.message.as_deref().unwrap_or(""))
                        }
                        Output::Text => eprintln!(
                            "daemon refused the config:\n{}",
                            reply.error.as_deref().unwrap_or("")
                        ),
                    }
                    return if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_ERROR)
                    };
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    fail(
                        args.output,
                        &format!("cannot reach the running daemon: {e}"),
                    );
                    return ExitCode::from(EXIT_ERROR);
                }
            }
        }
        // Plan under the lock, not before it: another reconcile may run while this one waits,
        // and a plan read before it would then be stale (and its revert would undo the other's
        // work). A dry run only reads, and needs no lock (nor privileges).
        let lock = if dry_run {
            None
        } else {
            match reconcile::lock() {
                Ok(l) => Some(l),
                Err(e) => {
                    fail(args.output, &e.to_string());
                    return ExitCode::from(EXIT_ERROR);
                }
            }
        };
        let (plan, want) = match reconcile::plan(&nl, &cfg, &host).await {
            Ok(p) => p,
            Err(e) => {
                fail(args.output, &e.to_string());
                return ExitCode::from(EXIT_ERROR);
            }
        };
        let status = if plan.is_empty() {
            "unchanged"
        } else if dry_run {
            "planned"
        } else {
            "applied"
        };
        if let (false, Some(lock)) = (plan.is_empty(), &lock) {
            if let Err(e) = reconcile::apply(&nl, lock, &want, &plan).await {
                match args.output {
                    Output::Text => {
                        print!("{}", plan.render_text());
                        eprintln!("error: {e}");
                    }
                    Output::Json => {
                        println!("{}", plan.render_json(Some(&e.to_string()), "failed"))
                    }
                }
                return ExitCode::from(EXIT_ERROR);
            }
        }
        match args.output {
            Output::Text => {
                print!("{}", plan.render_text());
                if status == "applied" {
                    println!("Applied and verified.");
                }
            }
            Output::Json => print!("{}", plan.render_json(None, status)),
        }
        if status == "planned" {
            ExitCode::from(EXIT_CHANGES)
        } else {
            ExitCode::SUCCESS
        }
    })
}

fn image_install(image: &str, root_hash: Option<&str>) -> ExitCode {
    if image.starts_with("http://") && root_hash.is_none() {
        eprintln!("error: an http:// image needs --root-hash (plain HTTP authenticates nothing)");
        return ExitCode::from(EXIT_USAGE);
    }
    match appliance::image::ab::install(image, root_hash) {
        Ok(Some((slot, hash))) => {
            println!(
                "slot {slot} installed and verified (root hash {hash}); reboot to try it once"
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            println!("{image} is the running image: nothing to install");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn workload_exec(spec: &std::path::Path, join: Option<i32>, command: &[String]) -> ExitCode {
    let parsed = std::fs::read(spec)
        .map_err(|e| format!("{}: {e}", spec.display()))
        .and_then(|b| {
            serde_json::from_slice::<appliance::workload::run::Spec>(&b)
                .map_err(|e| format!("{}: {e}", spec.display()))
        });
    let run = |s: appliance::workload::run::Spec| match join {
        Some(pid) => appliance::workload::run::join_exec(pid, command, &s.env),
        None => appliance::workload::run::exec(&s),
    };
    match parsed.and_then(run) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("workload: {e}");
            ExitCode::from(125)
        }
    }
}
