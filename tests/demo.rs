//! `make demo` is the main job: run it as a test so CI proves it still tells the story.

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = sandbox::demo::DemoOptions::new(support::AEGIS_BIN);
    opts.work_dir = dir.path().join("demo");
    if let Err(e) = sandbox::demo::run(opts).await {
        panic!("the demo failed: {e}");
    }
}
