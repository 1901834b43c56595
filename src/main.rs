fn main() {
    println!("search-img: service under construction");
}
