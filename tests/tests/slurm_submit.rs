//! SPEC §14: slurm/submit.sh and the slurm/*.sbatch templates, tested without a cluster.
//!
//! Every test copies slurm/ into a temporary "repository" (so logs/ and checkpoints/ land there), puts fake
//! `sbatch`, `squeue` and `scontrol` on PATH that record their arguments and hand out job ids 1001, 1002, …, and
//! checks what was (or would have been) submitted. The dry-run plan for a partially finished 5×5 tree is compared
//! with tests/golden/slurm_dry_run.txt (regenerate with UPDATE_GOLDEN=1 after an intended change).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ultrarefiner_tests::{temp_dir, workspace_root};

const DATASETS: [&str; 5] = ["BUSI", "BUSBRA", "BUS", "BUS_UC", "BUS_UCLM"];
const ALL: &str = "BUSI BUSBRA BUS BUS_UC BUS_UCLM";

/// Variables of slurm/site.env that must not leak from the developer's environment into the tests.
const SITE_VARS: [&str; 18] = [
    "PARTITION",
    "ACCOUNT",
    "QOS",
    "BIN_DIR",
    "CONFIG",
    "DEVICE",
    "RAW_ROOT",
    "DATA_ROOT",
    "AUG_ROOT",
    "CHECKPOINT_ROOT",
    "SAM_CHECKPOINT",
    "PHASE2_RUN",
    "PHASE3_SAM_CHECKPOINT",
    "NUM_WORKERS",
    "REQUEUE_ON_TERM",
    "UR_SITE_ENV",
    "SLURM_CPUS_PER_TASK",
    "SBATCH_EXPORT",
];

const FAKE_SBATCH: &str = r#"#!/bin/bash
# fake sbatch: records its arguments, prints the next job id (1001, 1002, ...) like `sbatch --parsable`
printf 'sbatch %s\n' "$*" >> "$FAKE_SLURM_DIR/calls.log"
if [[ -n "${FAKE_SBATCH_FAIL:-}" ]]; then echo "sbatch: error: Batch job submission failed" >&2; exit 1; fi
n=$(cat "$FAKE_SLURM_DIR/counter" 2>/dev/null || echo 1000)
n=$((n + 1))
echo "$n" > "$FAKE_SLURM_DIR/counter"
echo "$n;fakecluster"
"#;

const FAKE_RECORDER: &str = r#"#!/bin/bash
printf '%s %s\n' "$(basename "$0")" "$*" >> "$FAKE_SLURM_DIR/calls.log"
exit 0
"#;

/// Fake training binary for the template tests: records its arguments; exits with FAKE_EXIT, or (FAKE_WAIT_SIGNAL)
/// waits for SIGUSR1/SIGTERM like the real binaries and then exits with 75.
const FAKE_BINARY: &str = r#"#!/bin/bash
printf '%s %s\n' "$(basename "$0")" "$*" >> "$FAKE_SLURM_DIR/bin_calls.log"
if [[ -n "${FAKE_WAIT_SIGNAL:-}" ]]; then
  trap 'echo USR1 >> "$FAKE_SLURM_DIR/signals.log"; exit 75' USR1
  trap 'echo TERM >> "$FAKE_SLURM_DIR/signals.log"; exit 75' TERM
  touch "$FAKE_SLURM_DIR/started"
  for _ in $(seq 1 400); do sleep 0.05; done
  exit 0
fi
exit "${FAKE_EXIT:-0}"
"#;

fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A temporary repository with a copy of slurm/, fake Slurm commands and a checkpoint tree.
struct Sandbox {
    _tmp: tempfile::TempDir,
    repo: PathBuf,
    fake: PathBuf,
    site_env: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = temp_dir("ur-slurm-");
        let repo = tmp.path().join("repo");
        let fake = tmp.path().join("fake");
        fs::create_dir_all(repo.join("slurm")).unwrap();
        fs::create_dir_all(fake.join("bin")).unwrap();
        for entry in fs::read_dir(workspace_root().join("slurm")).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                fs::copy(&p, repo.join("slurm").join(p.file_name().unwrap())).unwrap();
            }
        }
        write_exec(&fake.join("bin/sbatch"), FAKE_SBATCH);
        write_exec(&fake.join("bin/squeue"), FAKE_RECORDER);
        write_exec(&fake.join("bin/scontrol"), FAKE_RECORDER);
        // An empty site file: the built-in defaults, whatever the developer's slurm/site.env says.
        let site_env = fake.join("site.env");
        fs::write(&site_env, "# test site settings\n").unwrap();
        Sandbox {
            _tmp: tmp,
            repo,
            fake,
            site_env,
        }
    }

    fn ckpt(&self) -> PathBuf {
        self.fake.join("ckpt")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for v in SITE_VARS {
            c.env_remove(v);
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("SLURM_") || k.starts_with("SBATCH_") {
                c.env_remove(k);
            }
        }
        let path = format!(
            "{}:{}",
            self.fake.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.env("PATH", path)
            .env("FAKE_SLURM_DIR", &self.fake)
            .env("UR_SITE_ENV", &self.site_env)
            .env("CHECKPOINT_ROOT", self.ckpt())
            .env("USER", "tester")
            .env("LC_ALL", "C")
            .current_dir(&self.repo);
        c
    }

    fn submit(&self, args: &[&str]) -> Output {
        self.command("bash")
            .arg(self.repo.join("slurm/submit.sh"))
            .args(args)
            .output()
            .unwrap()
    }

    fn calls(&self) -> Vec<String> {
        match fs::read_to_string(self.fake.join("calls.log")) {
            Ok(s) => s.lines().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn summary(&self, rel: &str, json: &str) {
        let dir = self.ckpt().join(rel);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("summary.json"), json).unwrap();
    }

    fn complete(&self, rel: &str) {
        self.summary(rel, "{\n  \"status\": \"complete\",\n  \"best\": {\"metric\": \"dice\", \"value\": 0.8, \"epoch\": 3}\n}\n");
    }

    /// Partially finished 5×5 tree. Phase 1: tasks 0-6 complete, 12 running, 15 failed, 20 only a latest.json;
    /// Phase 2: running; Phase 3: tasks 1, 2, 4, 5, 6 complete, 9 with an unreadable status (so 0,3,7-24 remain).
    fn partial_tree(&self) {
        for t in 0..=6 {
            self.complete(&format!("transunet/{}/fold_{}", DATASETS[t / 5], t % 5));
        }
        self.summary(
            "transunet/BUS/fold_2",
            r#"{"status":"running","epochs":150}"#,
        );
        self.summary(
            "transunet/BUS_UC/fold_0",
            r#"{"best":{"value":0.5},"status" : "failed"}"#,
        );
        let latest = self.ckpt().join("transunet/BUS_UCLM/fold_0");
        fs::create_dir_all(&latest).unwrap();
        fs::write(latest.join("latest.json"), "{}").unwrap();
        self.summary(
            "sam_finetuned/BUS_BUSBRA_BUSI_BUS_UC_BUS_UCLM",
            "{\"status\": \"running\"}",
        );
        for t in [1usize, 2, 4, 5, 6] {
            self.complete(&format!("ultra_refiner/{}/fold_{}", DATASETS[t / 5], t % 5));
        }
        self.summary("ultra_refiner/BUSBRA/fold_4", "not json");
    }

    fn all_complete(&self) {
        for t in 0..25 {
            let (d, f) = (DATASETS[t / 5], t % 5);
            self.complete(&format!("transunet/{d}/fold_{f}"));
            self.complete(&format!("ultra_refiner/{d}/fold_{f}"));
        }
        self.complete("sam_finetuned/BUS_BUSBRA_BUSI_BUS_UC_BUS_UCLM");
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

// ------------------------------------------------------------------------------------------------------------------
// submit.sh
// ------------------------------------------------------------------------------------------------------------------

#[test]
fn dry_run_partial_tree_matches_golden() {
    let sb = Sandbox::new();
    sb.partial_tree();
    let out = sb.submit(&["--dry-run"]);
    assert_ok(&out);
    let got = stdout(&out);
    assert!(sb.calls().is_empty(), "dry run called: {:?}", sb.calls());
    assert!(
        !sb.repo.join("logs").exists(),
        "dry run must not create logs/"
    );
    assert!(
        !got.contains(&*sb.fake.to_string_lossy()),
        "dry-run output must not contain temp paths:\n{got}"
    );

    let golden = workspace_root().join("tests/golden/slurm_dry_run.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(golden.parent().unwrap()).unwrap();
        fs::write(&golden, &got).unwrap();
    }
    let want = fs::read_to_string(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (create it with UPDATE_GOLDEN=1)", golden.display()));
    if got != want {
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            if g != w {
                panic!("dry-run output differs from {} at line {}:\n got: {g}\nwant: {w}\n\nfull output:\n{got}", golden.display(), i + 1);
            }
        }
        panic!(
            "dry-run output differs in length from {}:\n{got}",
            golden.display()
        );
    }
    // The essentials, independently of the golden file.
    assert!(
        got.contains("sbatch --parsable --array=7-24%8 slurm/phase1.sbatch\n"),
        "{got}"
    );
    assert!(
        got.contains("--dependency=afterok:<P1> --kill-on-invalid-dep=yes slurm/phase2.sbatch"),
        "{got}"
    );
    assert!(
        got.contains("--array=0,3,7-24%8 --dependency=afterok:<P1>:<P2>"),
        "{got}"
    );
}

#[test]
fn real_submission_chains_phases_with_job_ids() {
    let sb = Sandbox::new();
    sb.partial_tree();
    let out = sb.submit(&[]);
    assert_ok(&out);
    let calls = sb.calls();
    assert_eq!(
        calls,
        vec![
            "sbatch --parsable --array=7-24%8 slurm/phase1.sbatch".to_string(),
            format!("sbatch --parsable --dependency=afterok:1001 --kill-on-invalid-dep=yes slurm/phase2.sbatch {ALL}"),
            format!(
                "sbatch --parsable --array=0,3,7-24%8 --dependency=afterok:1001:1002 --kill-on-invalid-dep=yes \
                 slurm/phase3.sbatch {ALL}"
            ),
        ]
    );
    let s = stdout(&out);
    assert!(
        s.contains("Submitted: phase1=1001 phase2=1002 phase3=1003"),
        "{s}"
    );
    assert!(s.contains("squeue -u tester"), "{s}");
    assert!(
        s.contains("task 12  BUS      fold 2  running   -> submit"),
        "{s}"
    );
    assert!(
        s.contains("task  3  BUSI     fold 3  complete  -> skipped"),
        "{s}"
    );
    assert!(
        sb.repo.join("logs").is_dir(),
        "logs/ must exist before the jobs start"
    );
}

#[test]
fn phase0_parallel_p2_throttle_and_site_settings() {
    let sb = Sandbox::new();
    fs::write(
        &sb.site_env,
        "PARTITION=gpu\nACCOUNT=proj42\nSBATCH_EXTRA=(--constraint=h100 --mail-type=FAIL)\n",
    )
    .unwrap();
    let out = sb.submit(&[
        "--phases",
        "0,1,2,3",
        "--parallel-p2",
        "--throttle=4",
        "--datasets",
        "busi , BUS",
    ]);
    assert_ok(&out);
    let base =
        "sbatch --parsable --partition=gpu --account=proj42 --constraint=h100 --mail-type=FAIL";
    assert_eq!(
        sb.calls(),
        vec![
            format!("{base} slurm/prepare.sbatch BUSI BUS"),
            format!("{base} --array=0-4,10-14%4 --dependency=afterok:1001 --kill-on-invalid-dep=yes slurm/phase1.sbatch"),
            format!("{base} --dependency=afterok:1001 --kill-on-invalid-dep=yes slurm/phase2.sbatch BUSI BUS"),
            format!(
                "{base} --array=0-4,10-14%4 --dependency=afterok:1002:1003 --kill-on-invalid-dep=yes \
                 slurm/phase3.sbatch BUSI BUS"
            ),
        ]
    );
    let s = stdout(&out);
    assert!(
        s.contains("sam_finetuned/BUS_BUSI"),
        "phase 2 run = sorted dataset names: {s}"
    );
}

#[test]
fn finished_phase_is_left_out_of_the_chain() {
    let sb = Sandbox::new();
    for t in 0..25 {
        sb.complete(&format!("transunet/{}/fold_{}", DATASETS[t / 5], t % 5));
    }
    let out = sb.submit(&["--folds", "1,3", "--datasets", "BUSBRA,BUS_UCLM"]);
    assert_ok(&out);
    assert_eq!(
        sb.calls(),
        vec![
            "sbatch --parsable slurm/phase2.sbatch BUSBRA BUS_UCLM".to_string(),
            "sbatch --parsable --array=6,8,21,23%8 --dependency=afterok:1001 --kill-on-invalid-dep=yes \
             slurm/phase3.sbatch BUSBRA BUS_UCLM"
                .to_string(),
        ]
    );
    let s = stdout(&out);
    assert!(s.contains("phase 1 is left out of the chain"), "{s}");
    assert!(s.contains("sam_finetuned/BUSBRA_BUS_UCLM"), "{s}");

    // Only phase 3 left: no dependency at all.
    let sb = Sandbox::new();
    sb.all_complete();
    fs::remove_file(sb.ckpt().join("ultra_refiner/BUS_UC/fold_3/summary.json")).unwrap();
    let out = sb.submit(&[]);
    assert_ok(&out);
    assert_eq!(
        sb.calls(),
        vec![format!(
            "sbatch --parsable --array=18%8 slurm/phase3.sbatch {ALL}"
        )]
    );
}

#[test]
fn missing_prerequisites_are_warned_about() {
    let sb = Sandbox::new();
    let out = sb.submit(&[
        "--phases",
        "3",
        "--datasets",
        "BUS",
        "--folds",
        "0",
        "--dry-run",
    ]);
    assert_ok(&out);
    let s = stdout(&out);
    assert!(
        s.contains("warning: phase 3 task 10 needs phase 1 BUS fold 0 (status: missing)"),
        "{s}"
    );
    assert!(
        s.contains("warning: phase 3 needs the phase 2 run BUS (status: missing)"),
        "{s}"
    );
}

#[test]
fn nothing_to_do_submits_nothing() {
    let sb = Sandbox::new();
    sb.all_complete();
    for args in [&["--dry-run"][..], &[][..]] {
        let out = sb.submit(args);
        assert_ok(&out);
        let s = stdout(&out);
        assert!(
            s.contains("Nothing to submit: every selected task is complete."),
            "{s}"
        );
        assert!(!s.contains("sbatch --parsable"), "{s}");
    }
    assert!(sb.calls().is_empty(), "{:?}", sb.calls());
}

#[test]
fn unknown_dataset_phase_fold_and_option_are_clear_errors() {
    let sb = Sandbox::new();
    let cases: [(&[&str], &str); 7] = [
        (
            &["--datasets", "BUSI,FOO"],
            "unknown dataset 'FOO' (valid: BUSI BUSBRA BUS BUS_UC BUS_UCLM, or all)",
        ),
        (&["--datasets", "UDIAT"], "test-only"),
        (&["--phases", "1,4"], "unknown phase '4' (valid: 0-3)"),
        (&["--folds", "5"], "unknown fold '5' (valid: 0-4)"),
        (&["--throttle", "0"], "invalid --throttle '0'"),
        (&["--frobnicate"], "unknown argument '--frobnicate'"),
        (&["--phases", "--dry-run"], "--phases needs a value"),
    ];
    for (args, msg) in cases {
        let out = sb.submit(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(msg),
            "{args:?}: stderr lacks {msg:?}:\n{}",
            stderr(&out)
        );
        assert!(
            stdout(&out).is_empty(),
            "{args:?} printed a plan:\n{}",
            stdout(&out)
        );
    }
    assert!(sb.calls().is_empty());
}

#[test]
fn shipped_site_env_works() {
    let sb = Sandbox::new();
    let out = sb
        .command("bash")
        .arg(sb.repo.join("slurm/submit.sh"))
        .arg("--dry-run")
        .env_remove("UR_SITE_ENV")
        .output()
        .unwrap();
    assert_ok(&out);
    let s = stdout(&out);
    assert!(s.contains("slurm/phase1.sbatch"), "{s}");
    assert!(
        stderr(&out).contains("site settings: slurm/site.env"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sbatch_failure_is_reported() {
    let sb = Sandbox::new();
    let out = sb
        .command("bash")
        .arg(sb.repo.join("slurm/submit.sh"))
        .env("FAKE_SBATCH_FAIL", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("sbatch failed for phase 1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_teaches() {
    let sb = Sandbox::new();
    let out = sb.submit(&["--help"]);
    assert_ok(&out);
    let s = stdout(&out);
    for needle in [
        "--phases",
        "--datasets",
        "--folds",
        "--throttle",
        "--dry-run",
        "--parallel-p2",
        "site.env",
        "summary.json",
        "afterok",
    ] {
        assert!(s.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn scripts_pass_bash_syntax_check_and_shellcheck_if_present() {
    let dir = workspace_root().join("slurm");
    let mut scripts: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("sh" | "sbatch" | "env")
            )
        })
        .collect();
    scripts.sort();
    let names: Vec<String> = scripts
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "submit.sh",
        "common.sh",
        "site.env",
        "phase1.sbatch",
        "phase2.sbatch",
        "phase3.sbatch",
        "prepare.sbatch",
    ] {
        assert!(names.iter().any(|n| n == want), "slurm/{want} missing");
    }
    for s in &scripts {
        let out = Command::new("bash").arg("-n").arg(s).output().unwrap();
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            s.display(),
            stderr(&out)
        );
    }
    for s in [
        "submit.sh",
        "phase1.sbatch",
        "phase2.sbatch",
        "phase3.sbatch",
        "prepare.sbatch",
    ] {
        let mode = fs::metadata(dir.join(s)).unwrap().permissions().mode();
        assert!(
            mode & 0o111 != 0 || s.ends_with(".sbatch"),
            "slurm/{s} is not executable"
        );
    }
    // shellcheck is optional (not every machine has it).
    let sc = Command::new("shellcheck")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if matches!(sc, Ok(st) if st.success()) {
        let out = Command::new("shellcheck")
            .arg("-x")
            .args(&scripts)
            .current_dir(workspace_root())
            .output()
            .unwrap();
        assert!(out.status.success(), "shellcheck:\n{}", stdout(&out));
    }
}

#[test]
fn templates_carry_the_spec_directives() {
    for (name, gpu, array) in [
        ("phase1.sbatch", true, true),
        ("phase2.sbatch", true, false),
        ("phase3.sbatch", true, true),
        ("prepare.sbatch", false, false),
    ] {
        let text = fs::read_to_string(workspace_root().join("slurm").join(name)).unwrap();
        let directives: Vec<&str> = text.lines().filter(|l| l.starts_with("#SBATCH")).collect();
        let has = |d: &str| {
            directives
                .iter()
                .any(|l| l.trim() == format!("#SBATCH {d}"))
        };
        for d in [
            "--cpus-per-task=16",
            "--mem=64G",
            "--time=48:00:00",
            "--requeue",
        ] {
            assert!(has(d), "{name} lacks #SBATCH {d}");
        }
        assert_eq!(has("--gres=gpu:1"), gpu, "{name}: --gres=gpu:1");
        assert_eq!(has("-o logs/%x_%A_%a.out"), array, "{name}: array log name");
        assert!(
            text.contains("source \"${UR_SITE_ENV:-slurm/site.env}\""),
            "{name} must source site.env"
        );
        if name != "prepare.sbatch" {
            assert!(
                text.contains("--resume auto"),
                "{name} must run with --resume auto"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------------------------
// The templates, run outside Slurm with fake binaries and a fake scontrol
// ------------------------------------------------------------------------------------------------------------------

impl Sandbox {
    fn fake_binaries(&self) {
        let bin = self.fake.join("release");
        fs::create_dir_all(&bin).unwrap();
        for b in ["phase1", "phase2", "phase3", "ultrarefiner"] {
            write_exec(&bin.join(b), FAKE_BINARY);
        }
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&self.site_env)
            .unwrap();
        writeln!(f, "BIN_DIR=\"${{BIN_DIR:-{}}}\"", bin.display()).unwrap();
    }

    fn job(&self, template: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = self.command("bash");
        c.arg(format!("slurm/{template}"))
            .args(args)
            .env("SLURM_SUBMIT_DIR", &self.repo);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn bin_calls(&self) -> Vec<String> {
        match fs::read_to_string(self.fake.join("bin_calls.log")) {
            Ok(s) => s.lines().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[test]
fn phase1_task_maps_to_dataset_and_fold_and_requeues_on_75() {
    let sb = Sandbox::new();
    sb.fake_binaries();
    let env = [
        ("SLURM_JOB_ID", "512"),
        ("SLURM_ARRAY_JOB_ID", "500"),
        ("SLURM_ARRAY_TASK_ID", "12"),
    ];

    let out = sb
        .job("phase1.sbatch", &[], &env)
        .env("FAKE_EXIT", "0")
        .output()
        .unwrap();
    assert_ok(&out);
    let ck = sb.ckpt();
    assert_eq!(
        sb.bin_calls(),
        vec![format!(
            "phase1 --config paper --device cuda:0 --data-root dataset/processed --dataset BUS --fold 2 \
             --output-dir {}/transunet --exp-name BUS/fold_2 --num-workers 16 --plain --resume auto",
            ck.display()
        )]
    );
    assert!(
        sb.calls().is_empty(),
        "no requeue on success: {:?}",
        sb.calls()
    );

    let out = sb
        .job("phase1.sbatch", &[], &env)
        .env("FAKE_EXIT", "75")
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(sb.calls(), vec!["scontrol requeue 500_12".to_string()]);

    let out = sb
        .job("phase1.sbatch", &[], &env)
        .env("FAKE_EXIT", "3")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "a real failure keeps its status"
    );
    assert_eq!(sb.calls().len(), 1, "no requeue on failure");

    // Every task id maps as SPEC §14 says; an out-of-range id is an error.
    for t in [0usize, 4, 5, 19, 24] {
        let id = t.to_string();
        let out = sb
            .job("phase1.sbatch", &[], &[("SLURM_ARRAY_TASK_ID", &id)])
            .output()
            .unwrap();
        assert_ok(&out);
        let last = sb.bin_calls().last().unwrap().clone();
        assert!(
            last.contains(&format!("--dataset {} --fold {} ", DATASETS[t / 5], t % 5)),
            "task {t}: {last}"
        );
    }
    let out = sb
        .job("phase1.sbatch", &[], &[("SLURM_ARRAY_TASK_ID", "25")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("outside 0..24"), "{}", stderr(&out));
}

#[test]
fn phase2_phase3_prepare_command_lines() {
    let sb = Sandbox::new();
    sb.fake_binaries();
    let ck = sb.ckpt();

    let out = sb
        .job("phase2.sbatch", &["BUSI", "BUS"], &[("SLURM_JOB_ID", "77")])
        .env("FAKE_EXIT", "75")
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        sb.bin_calls().last().unwrap(),
        &format!(
            "phase2 --config paper --device cuda:0 --data-root dataset/augmented --dataset BUS_BUSI \
             --processed-root dataset/processed --sam-checkpoint medsam-vit-b --output-dir {}/sam_finetuned \
             --num-workers 16 --plain --resume auto",
            ck.display()
        )
    );
    assert_eq!(
        sb.calls(),
        vec!["scontrol requeue 77".to_string()],
        "non-array job: plain job id"
    );

    let out = sb
        .job(
            "phase3.sbatch",
            &[],
            &[("SLURM_ARRAY_TASK_ID", "21"), ("SLURM_CPUS_PER_TASK", "8")],
        )
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        sb.bin_calls().last().unwrap(),
        &format!(
            "phase3 --config paper --device cuda:0 --data-root dataset/processed --dataset BUS_UCLM --fold 1 \
             --transunet-checkpoint {c}/transunet/BUS_UCLM/fold_1/best.safetensors \
             --sam-checkpoint {c}/sam_finetuned/BUS_BUSBRA_BUSI_BUS_UC_BUS_UCLM/best_sam.safetensors \
             --output-dir {c}/ultra_refiner --exp-name BUS_UCLM/fold_1 --num-workers 8 --plain --resume auto",
            c = ck.display()
        )
    );

    let out = sb
        .job(
            "prepare.sbatch",
            &["BUSI", "BUS_UC"],
            &[("SLURM_JOB_ID", "5")],
        )
        .output()
        .unwrap();
    assert_ok(&out);
    let calls = sb.bin_calls();
    assert_eq!(
        &calls[calls.len() - 2..],
        &[
            "ultrarefiner prepare datasets --raw-root dataset/raw --output-root dataset/processed --datasets BUSI,BUS_UC"
                .to_string(),
            "ultrarefiner augment synthetic --processed-root dataset/processed --output-root dataset/augmented \
             --datasets BUSI,BUS_UC --num-workers 16 --resume"
                .to_string(),
        ]
    );

    // A missing binary is a clear error, not a requeue loop.
    let out = sb
        .job(
            "phase1.sbatch",
            &[],
            &[("SLURM_ARRAY_TASK_ID", "0"), ("BIN_DIR", "/nonexistent")],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("binary '/nonexistent/phase1' not found"),
        "{}",
        stderr(&out)
    );
}

fn wait_for(path: &Path, what: &str) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_child(child: &mut std::process::Child) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("job script did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `#SBATCH --signal=B:USR1@600` signals only the batch shell: it must forward the signal to the binary, which
/// stops with 75, and the task requeues itself. After SIGTERM (scancel) it must not requeue.
#[test]
fn batch_shell_forwards_signals() {
    for (sig, requeue) in [("USR1", true), ("TERM", false)] {
        let sb = Sandbox::new();
        sb.fake_binaries();
        let mut child = sb
            .job(
                "phase1.sbatch",
                &[],
                &[
                    ("SLURM_JOB_ID", "612"),
                    ("SLURM_ARRAY_JOB_ID", "600"),
                    ("SLURM_ARRAY_TASK_ID", "3"),
                ],
            )
            .env("FAKE_WAIT_SIGNAL", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&sb.fake.join("started"), "the fake binary to start");
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let status = wait_child(&mut child);
        let signals = fs::read_to_string(sb.fake.join("signals.log")).unwrap_or_default();
        assert_eq!(signals.trim(), sig, "the binary must receive SIG{sig}");
        if requeue {
            assert_eq!(status.code(), Some(0));
            assert_eq!(sb.calls(), vec!["scontrol requeue 600_3".to_string()]);
        } else {
            assert_eq!(status.code(), Some(75));
            assert!(
                sb.calls().is_empty(),
                "no requeue after SIGTERM: {:?}",
                sb.calls()
            );
        }
    }
}
