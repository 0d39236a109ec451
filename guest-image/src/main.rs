//! `guest-image`: builds the test guest and prints the artefact paths, one per line
//! (`elf_pvh=...`, `elf_linux=...`, `bzimage=...`), for scripts.

fn main() {
    match guest_image::build() {
        Ok(a) => {
            println!("elf_pvh={}", a.elf_pvh.display());
            println!("elf_linux={}", a.elf_linux.display());
            println!("bzimage={}", a.bzimage.display());
        }
        Err(e) => {
            eprintln!("guest-image: {e}");
            std::process::exit(1);
        }
    }
}
