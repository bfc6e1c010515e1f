//! Rebuilds the hub when a migration changes: `sqlx::migrate!` embeds `migrations/` at compile
//! time, and cargo would not otherwise notice an edited or added `.sql` file.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
