export declare function installWorkerSchema(connectionString: string): Promise<void>;
