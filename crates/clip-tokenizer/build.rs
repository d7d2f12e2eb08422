fn main() {
    testdata::build_script();
}
