//! The shipped templates (include_dir) and the migrations (sqlx::migrate!) are compiled into
//! the binary: rebuild when they change.
fn main() {
    println!("cargo:rerun-if-changed=templates");
    println!("cargo:rerun-if-changed=migrations");
}
