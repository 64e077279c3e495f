//! A worker's secrets stay out of its task programs' reach (issue 12, "many tenants on one
//! system"): a real `claw-worker` connected with a real password, holding an LLM key, runs an
//! `exec` program that looks for both where a child can look: its own environment and its
//! parent's `/proc/<ppid>/environ`. The secrets come from variables (which the worker scrubs
//! at start) and from files (`--nats-password-file`, `api_key_file`). Then the file flags end
//! to end with the shipped roles, and children running as another user (`[isolation] user`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use claw_proto::topology::Settings;
use claw_proto::{Status, TaskRecord};
use claw_tests::deploy::{GatewayService, Service, Shipped, wait_for_worker};
use claw_tests::{
    Nats, archived_ids, bin, id_of, post_json, role_password, submit_direct, wait_for, wait_status,
    write_script,
};
use serde_json::json;

/// The llm kind's key, as the worker is given it. Never sent anywhere: no llm task runs.
const LLM_KEY: &str = "sk-claw-test-0123456789abcdef";
const LLM_VAR: &str = "CLAW_TEST_LLM_KEY";
/// A variable of the worker's that is no secret: seeing it proves the program could read the
/// worker's environment at all.
const MARKER: &str = "CLAW_TEST_VISIBLE=yes";

fn settings() -> Settings {
    Settings { ack_wait_s: Some(5.0), ..Settings::standard() }
}

/// A program that copies its parent's pid and environment, and its own environment, into the
/// directory it is given, then prints an empty result.
fn snoop(dir: &Path) -> PathBuf {
    write_script(
        dir,
        "snoop.sh",
        "#!/bin/sh\nout=$1\necho $PPID > \"$out/ppid\"\n\
         cat /proc/$PPID/environ > \"$out/parent\" 2> \"$out/parent.err\"\n\
         cat /proc/self/environ > \"$out/own\"\n\
         echo '{\"result\": {}}'\n",
    )
}

/// What the program found, read back.
struct Found {
    ppid: u32,
    parent: Vec<u8>,
    parent_error: String,
    own: Vec<u8>,
}

impl Found {
    fn read(out: &Path) -> Found {
        let text = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
        Found {
            ppid: text("ppid").trim().parse().expect("the program wrote its parent's pid"),
            parent: std::fs::read(out.join("parent")).unwrap_or_default(),
            parent_error: text("parent.err"),
            own: std::fs::read(out.join("own")).expect("the program's own environment"),
        }
    }

    /// Asserts that none of `secrets` is in either environment, and that the parent's was
    /// really read (else the test would pass for nothing), unless the kernel refused to show
    /// it, which is the other way to keep it.
    fn assert_clean(&self, secrets: &[&str]) {
        let has = |bytes: &[u8], s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
        if self.parent_error.is_empty() {
            assert!(has(&self.parent, MARKER), "the parent's environment was read");
        } else {
            eprintln!("the parent's environment is not readable: {}", self.parent_error.trim());
        }
        for secret in secrets {
            assert!(!has(&self.parent, secret), "{secret:?} in /proc/$PPID/environ");
            assert!(!has(&self.own, secret), "{secret:?} in the program's own environment");
        }
    }
}

/// The environment of a service connecting as `role`, its password in a file: the shipped
/// deployment's `role_env` with `NATS_PASSWORD_FILE` in place of `NATS_PASSWORD`.
fn role_env_with_file(env: Vec<(String, String)>, dir: &Path, role: &str) -> Vec<(String, String)> {
    let file = dir.join(format!("{role}.password"));
    std::fs::write(&file, format!("{}\n", role_password(role))).unwrap();
    env.into_iter()
        .filter(|(k, _)| k != "NATS_PASSWORD")
        .chain([("NATS_PASSWORD_FILE".to_owned(), file.display().to_string())])
        .collect()
}

/// Starts a `claw-worker` on `nats` as the worker role with `toml` and `env`, runs the snoop
/// program once, and returns what it found and the worker's pid.
async fn snoop_through(nats: &Nats, name: &str, toml: &str, env: &[(String, String)]) -> Found {
    let dir = nats.dir.path();
    let topology = nats.role_topology("gateway", &settings()).await;
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).unwrap();
    let mut worker =
        Service::start(dir, name, "claw-worker", &["--config", config.to_str().unwrap()], env);
    let operator = nats.role("operator");
    let operator = claw_proto::connect::connect(&operator, "operator").await.unwrap();
    wait_for_worker(&operator, &mut worker).await;
    let out = dir.join(format!("{name}-found"));
    std::fs::create_dir_all(&out).unwrap();
    let spec = json!({"kind": "exec", "input": {"program": "snoop", "args": [out]}});
    let id = submit_direct(&topology, spec).await;
    let record =
        wait_for("the snoop task to end", Duration::from_secs(30), || {
            let (topology, id) = (&topology, &id);
            async move {
                claw_tests::record(topology, id.as_str()).await.filter(|r| r.status.is_terminal())
            }
        })
        .await;
    assert_eq!(record.status, Status::Succeeded, "{record:?}\n{}", worker.log_text());
    let found = Found::read(&out);
    assert_eq!(found.ppid, worker.pid(), "the program is the worker's child");
    worker.assert_running();
    found
}

fn worker_env(nats: &Nats) -> Vec<(String, String)> {
    let (key, value) = MARKER.split_once('=').unwrap();
    vec![
        ("NATS_URL".into(), nats.url()),
        ("NATS_USER".into(), "worker".into()),
        ("NATS_INBOX_PREFIX".into(), "_INBOX.worker".into()),
        (key.into(), value.into()),
    ]
}

fn worker_toml(name: &str, snoop: &Path, key_source: &str) -> String {
    format!(
        "name = {name:?}\nack_deadline_s = 5.0\n\
         [programs.snoop]\npath = {snoop:?}\n\
         [llm]\nbase_url = \"http://127.0.0.1:9\"\nmodel = \"m\"\n{key_source}\n"
    )
}

/// Fails before issue 12's change: the worker kept `NATS_PASSWORD` and the key's variable in
/// its environment, and its program read them from `/proc/$PPID/environ`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_program_finds_neither_the_nats_password_nor_the_llm_key() {
    let nats = Nats::start_secure();
    let dir = nats.dir.path();
    let snoop = snoop(dir);
    let password = role_password("worker");

    // In variables, as compose.yaml gives them.
    let mut env = worker_env(&nats);
    env.push(("NATS_PASSWORD".into(), password.clone()));
    env.push((LLM_VAR.into(), LLM_KEY.into()));
    let toml = worker_toml("w-vars", &snoop, &format!("api_key_env = {LLM_VAR:?}"));
    let found = snoop_through(&nats, "w-vars", &toml, &env).await;
    found.assert_clean(&[&password, LLM_KEY]);

    // In files: they never enter an environment.
    let key_file = dir.join("llm.key");
    std::fs::write(&key_file, format!("{LLM_KEY}\n")).unwrap();
    let env = role_env_with_file(worker_env(&nats), dir, "worker");
    let toml = worker_toml("w-files", &snoop, &format!("api_key_file = {key_file:?}"));
    let found = snoop_through(&nats, "w-files", &toml, &env).await;
    found.assert_clean(&[&password, LLM_KEY]);
}

/// Runs `claw-worker` with `args`, `env` and `toml` to its early exit; returns its stderr.
fn refused_start(dir: &Path, args: &[&str], env: &[(&str, &str)], toml: &str) -> String {
    let config = dir.join("refused.toml");
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(bin("claw-worker"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("NATS_PASSWORD")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the worker started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn secret_files_that_cannot_be_used_stop_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-file");
    let missing_arg = missing.to_str().unwrap();
    // Port 9 has no NATS: the file is read before any connection is tried.
    let url = ("NATS_URL", "nats://127.0.0.1:9");
    let stderr = refused_start(
        dir.path(),
        &["--nats-user", "worker", "--nats-password-file", missing_arg],
        &[url],
        "",
    );
    assert!(stderr.contains(missing_arg) && stderr.contains("secret file"), "{stderr}");
    let stderr = refused_start(
        dir.path(),
        &["--nats-password", "p", "--nats-password-file", missing_arg],
        &[url],
        "",
    );
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let toml = format!("[llm]\nbase_url = \"http://x\"\nmodel = \"m\"\napi_key_file = {missing:?}");
    let stderr = refused_start(dir.path(), &[], &[url], &toml);
    assert!(stderr.contains(missing_arg) && stderr.contains("api_key_file"), "{stderr}");
    let both = format!("{toml}\napi_key_env = \"K\"");
    let stderr = refused_start(dir.path(), &[], &[url], &both);
    assert!(stderr.contains("both set"), "{stderr}");
}

/// Every service of the shipped deployment reads its password from a file: a task goes from
/// HTTP to the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_connect_with_password_files_as_the_shipped_roles() {
    let nats = Shipped::single();
    let dir = nats.dir.path();
    let env = |role: &str| role_env_with_file(nats.role_env(role), dir, role);
    let gateway = GatewayService::start(dir, "gateway", &[], &env("gateway")).await;
    let mut worker = Service::start(dir, "worker", "claw-worker", &[], &env("worker"));
    let db = dir.join("archive.sqlite");
    let db_arg = db.to_str().unwrap();
    let mut archiver =
        Service::start(dir, "archiver", "claw-archiver", &["--db", db_arg], &env("archiver"));
    let operator = claw_proto::connect::NatsArgs::url(nats.url())
        .with_user("operator", &role_password("operator"));
    let operator = claw_proto::connect::connect(&operator, "operator").await.unwrap();
    wait_for_worker(&operator, &mut worker).await;

    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep", "session": "files", "input": {"seconds": 0.1}});
    let id = id_of(&post_json(&http, &gateway.url("/v1/tasks"), Some(&spec)).await);
    let record: TaskRecord = wait_for("the task to finish", Duration::from_secs(30), || {
        let (http, url) = (&http, gateway.url(&format!("/v1/tasks/{id}")));
        async move {
            let record: TaskRecord = http.get(url).send().await.ok()?.json().await.ok()?;
            record.status.is_terminal().then_some(record)
        }
    })
    .await;
    assert_eq!(record.status, Status::Succeeded, "{record:?}\n{}", worker.log_text());
    wait_for("the task in the archive", Duration::from_secs(30), || {
        let (db, id) = (&db, &id);
        async move { archived_ids(db).await.contains(id).then_some(()) }
    })
    .await;
    worker.assert_running();
    archiver.assert_running();
    let violations = nats.violations();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// With `[isolation] user = "nobody"`, a worker running as root starts its programs as nobody,
/// with no supplementary groups: they cannot read the worker's environment nor its password
/// file (mode 0600). Skipped where the test does not run as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_run_as_the_configured_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching children to another user needs a worker running as root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a user nobody");
    let nats = Nats::start_secure();
    let dir = nats.dir.path();
    let env = role_env_with_file(worker_env(&nats), dir, "worker");
    let password_file = dir.join("worker.password");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The test directory is root's 0700: the program reports on stdout, not into a file.
    let script = format!(
        "#!/bin/sh\nif cat {password_file:?} >/dev/null 2>&1; then f=true; else f=false; fi\n\
         if cat /proc/$PPID/environ >/dev/null 2>&1; then e=true; else e=false; fi\n\
         echo \"{{\\\"result\\\": {{\\\"uid\\\": $(id -u), \\\"gid\\\": $(id -g), \\\"groups\\\": \\\"$(id -G)\\\", \\\"file\\\": $f, \\\"environ\\\": $e, \\\"cwd\\\": \\\"$(pwd)\\\"}}}}\"\n"
    );
    let whoami = write_script(dir, "whoami.sh", &script);
    // The program must be reachable for nobody: the test directory is not.
    let programs = tempfile::Builder::new().prefix("claw-test-programs-").tempdir().unwrap();
    std::fs::set_permissions(programs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = programs.path().join("whoami.sh");
    std::fs::copy(&whoami, &program).unwrap();
    let toml = format!(
        "name = \"w-nobody\"\nack_deadline_s = 5.0\n[isolation]\nuser = \"nobody\"\n\
         [programs.whoami]\npath = {program:?}\n"
    );
    let config = dir.join("w-nobody.toml");
    std::fs::write(&config, toml).unwrap();
    let topology = nats.role_topology("gateway", &settings()).await;
    let mut worker = Service::start(
        dir,
        "w-nobody",
        "claw-worker",
        &["--config", config.to_str().unwrap()],
        &env,
    );
    let operator = claw_proto::connect::connect(&nats.role("operator"), "operator").await.unwrap();
    wait_for_worker(&operator, &mut worker).await;
    let id =
        submit_direct(&topology, json!({"kind": "exec", "input": {"program": "whoami"}})).await;
    let record = wait_status(&topology, id.as_str(), Status::Succeeded).await;
    let result = record.result.expect("a result");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    assert_eq!(
        (result["uid"].as_u64(), result["gid"].as_u64()),
        (Some(uid.into()), Some(gid.into()))
    );
    assert_eq!(result["groups"], gid.to_string(), "no supplementary groups: {result}");
    assert_eq!(result["file"], false, "nobody read the worker's password file: {result}");
    assert_eq!(result["environ"], false, "nobody read the worker's environment: {result}");
    assert!(result["cwd"].as_str().unwrap().contains("claw-task-"), "{result}");
    worker.assert_running();
}
